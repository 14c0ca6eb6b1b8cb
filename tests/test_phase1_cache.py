"""Phase-1 cache: one training per key across processes; a stale lock is taken over by exactly one
waiter, judged on the waiter's own clock; an owner removes only its own lock; a crash leaves
nothing that blocks the next owner."""

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from lpt_core.config import PhaseConfig
from tune.names import PHASE1_LOCK, PHASE1_PROMPTS, PHASE1_STATE
from tune.phase1.cache import TAKEOVER, Phase1Cache

# A waiter's stale limit far above the owner's heartbeat, so that a loaded machine (a thread not
# scheduled for a while) cannot make a live owner look dead
STALE_S, BEAT_S = 3.0, 0.1


def _worker(
    root: str,
    key: str,
    log_dir: str,
    results: str,
    train_s: float = 1.5,
    stale_after_s: float = 60.0,
    heartbeat_s: float = 5.0,
    until_trainings: int = 0,
    until_file: str | None = None,
    log_file: str | None = None,
) -> None:
    """``get_or_train`` whose training takes ``train_s``, then lasts until ``until_trainings`` have
    started and ``until_file`` exists; the cache's messages go to ``log_file``."""

    def train(folder: Path) -> dict:
        (Path(log_dir) / f"trained-{os.getpid()}").touch()
        time.sleep(train_s)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            len(list(Path(log_dir).iterdir())) < until_trainings or (until_file and not Path(until_file).exists())
        ):
            time.sleep(0.05)
        (folder / PHASE1_PROMPTS).write_bytes(b"prompts")
        return {"by": os.getpid()}

    def log(message: str) -> None:
        if log_file:
            with open(log_file, "a") as f:
                f.write(message + "\n")

    cache = Phase1Cache(root, poll_s=0.05, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)
    path, trained = cache.get_or_train(key, train, log=log)
    Path(results, f"{os.getpid()}").write_text(f"{path}|{trained}")


def _start(target, *args, **kwargs):
    proc = mp.get_context("spawn").Process(target=target, args=args, kwargs=kwargs)
    proc.start()
    return proc


def _join(procs):
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def _dirs(tmp_path):
    logs, results = tmp_path / "logs", tmp_path / "results"
    logs.mkdir(), results.mkdir()
    return logs, results


def test_concurrent_trials_train_phase1_once(tmp_path):
    logs, results = _dirs(tmp_path)
    procs = [_start(_worker, str(tmp_path / "cache"), "k1", str(logs), str(results)) for _ in range(3)]
    _join(procs)
    assert len(list(logs.iterdir())) == 1
    outcomes = [f.read_text().split("|") for f in results.iterdir()]
    assert sorted(t for _, t in outcomes) == ["False", "False", "True"]
    assert {p for p, _ in outcomes} == {str(tmp_path / "cache" / "k1" / PHASE1_PROMPTS)}
    assert Phase1Cache(tmp_path / "cache").info("k1")["by"] > 0
    entry = tmp_path / "cache" / "k1"
    assert sorted(p.name for p in entry.iterdir()) == ["info.json", PHASE1_PROMPTS]  # no lock, no temporary file


def _stale_lock(folder: Path) -> bytes:
    """The lock of an owner on another host that stopped beating; its mtime an hour in the future
    (a clock ahead of ours, or NFS's cached attributes): only its unchanged content tells."""
    folder.mkdir(parents=True)
    content = json.dumps({"token": "t0", "host": "elsewhere", "pid": 1, "beat": 7}).encode()
    (folder / PHASE1_LOCK).write_bytes(content)
    ahead = time.time() + 3600
    os.utime(folder / PHASE1_LOCK, (ahead, ahead))
    return content


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_by_exactly_one_of_its_waiters(tmp_path):
    logs, results = _dirs(tmp_path)
    _stale_lock(tmp_path / "cache" / "k2")
    procs = [
        _start(_worker, str(tmp_path / "cache"), "k2", str(logs), str(results), 1.5, STALE_S, BEAT_S) for _ in range(3)
    ]
    _join(procs)
    assert len(list(logs.iterdir())) == 1  # one training, not one per waiter
    assert sorted(f.read_text().split("|")[1] for f in results.iterdir()) == ["False", "False", "True"]
    assert not list((tmp_path / "cache" / "k2").glob(PHASE1_LOCK + "*"))  # the lock and the takeover marker


def test_a_stale_lock_is_judged_on_the_waiters_clock(tmp_path):
    _stale_lock(tmp_path / "k3")
    cache = Phase1Cache(tmp_path, poll_s=0.05, stale_after_s=0.5)
    started = time.monotonic()

    def train(folder):
        (folder / PHASE1_PROMPTS).write_bytes(b"x")
        return {}

    path, trained = cache.get_or_train("k3", train, log=lambda m: None)
    assert trained and path.read_bytes() == b"x"
    assert 0.5 <= time.monotonic() - started < 10


@pytest.mark.slow
def test_a_live_owner_is_not_taken_over_and_an_owner_removes_only_its_own_lock(tmp_path):
    logs, results = _dirs(tmp_path)
    root = str(tmp_path / "cache")
    # a beating owner, training for several of the waiter's stale limits after it started waiting
    done, said = tmp_path / "done", tmp_path / "waiter-said.txt"
    owner = _start(_worker, root, "live", str(logs), str(results), 0.0, STALE_S, BEAT_S, until_file=str(done))
    while not (tmp_path / "cache" / "live" / PHASE1_LOCK).exists():
        time.sleep(0.02)
    waiter = _start(_worker, root, "live", str(logs), str(results), 0.0, STALE_S, BEAT_S, log_file=str(said))
    while not (said.exists() and "waiting" in said.read_text()):
        assert waiter.is_alive()
        time.sleep(0.05)
    time.sleep(3 * STALE_S)
    done.touch()
    _join([owner, waiter])
    assert len(list(logs.iterdir())) == 1

    # an owner that stalls (no heartbeat for longer than the stale limit) is taken over; when it
    # resumes and ends, it leaves the new owner's lock in place
    for f in [*logs.iterdir(), *results.iterdir()]:
        f.unlink()
    slow = _start(_worker, root, "stall", str(logs), str(results), 0.0, 60.0, 3600.0, until_trainings=2)
    lock = tmp_path / "cache" / "stall" / PHASE1_LOCK
    while not lock.exists():
        time.sleep(0.02)
    first = json.loads(lock.read_text())
    checked = tmp_path / "checked"
    taker = _start(_worker, root, "stall", str(logs), str(results), 0.0, 0.5, BEAT_S, until_file=str(checked))
    slow.join(60)
    assert slow.exitcode == 0
    held = json.loads(lock.read_text())  # the stalled owner ended: the lock is the taker's
    assert held["pid"] == taker.pid and held["token"] != first["token"]
    checked.touch()
    _join([taker])
    assert not lock.exists() and len(list(logs.iterdir())) == 2


def _crash_mid_phase1(root: str, key: str) -> None:
    def train(folder):
        (folder / PHASE1_STATE).write_bytes(b"epoch 1")
        os._exit(1)  # killed mid-phase 1: lock and resume state stay behind

    Phase1Cache(root).get_or_train(key, train, log=lambda m: None)


def test_a_crash_mid_phase1_does_not_block_the_next_owner(tmp_path):
    proc = _start(_crash_mid_phase1, str(tmp_path), "k4")
    proc.join(60)
    assert proc.exitcode == 1
    lock = tmp_path / "k4" / PHASE1_LOCK
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    resumed_from = []

    def train(folder):
        resumed_from.append((folder / PHASE1_STATE).read_bytes())
        (folder / PHASE1_PROMPTS).write_bytes(b"x")
        return {}

    started = time.monotonic()
    path, trained = Phase1Cache(tmp_path, poll_s=0.05).get_or_train("k4", train, log=lambda m: None)
    assert trained and resumed_from == [b"epoch 1"]
    assert time.monotonic() - started < 5  # the owner's process is gone: no 60 s stale wait
    assert not lock.exists() and not list(lock.parent.glob(TAKEOVER + "*"))


def other(name: str, value):
    """A valid value of PhaseConfig field ``name`` that differs from ``value``."""
    if name in ("sampling", "warmup"):
        return {"dual": "instance", "instance": "dual", "epoch": "step", "step": "epoch"}[value]
    return value + 1 if isinstance(value, int) else round(value / 2 + 0.01, 6)


def test_the_key_holds_every_input_of_phase_1_and_no_phase_2_value():
    """Any input that changes phase 1's prompts or head changes its key, so one key never holds
    two results; a phase-2-only value (the pool's shape included: LPT draws the phase-1 tensors
    from generators of their own) leaves it equal, so trials share their phase 1."""
    from lpt_core.data.manifest import manifest_hash
    from tune.config.loading import load_profile, profile_data
    from tune.trial.phase1 import profile_phase1_key

    def key(*sets, seed=0, length=5, device=None):
        profile = load_profile("smoke", list(sets))[1]
        data = profile_data(profile)
        return profile_phase1_key(profile, manifest_hash(data), length, data, seed, device)

    base = key()
    assert base == key() == key(device="cpu")
    phase1 = load_profile("smoke")[1]["phase1"]
    changed = [
        f"phase1.{name}={other(name, value)}"
        for name, value in PhaseConfig().to_dict().items()
        for value in [phase1.get(name, value)]
    ]
    changed += [
        "model.head_dropout=0.2",
        "compile=true",
        "data.gpu_augment=true",
        "loader.num_workers=2",
        "backbone.depth=3",
        "data.seed=1",
        "input.crop_pct=1.0",
        "input.interpolation=bicubic",
    ]
    for text in changed:
        assert key(text) != base, text
    assert key(seed=1) != base and key(length=4) != base and key(device="cuda") != base
    same = [f"phase2.{name}={other(name, value)}" for name, value in PhaseConfig().to_dict().items()]
    same += [
        "model.pool_size=20",
        "model.top_k=3",
        "model.group_start=3",
        "resources.cpu=2",
        "loader.eval_batch_size=50",
        "shot_split=released",
        "images_per_s=100",
    ]
    for text in same:
        assert key(text) == base, text
    # on the device path the loader workers draw no crops: their count does not matter there
    assert key("data.gpu_augment=true", "loader.num_workers=2") == key("data.gpu_augment=true")


def test_a_trial_whose_phase1_is_missing_trains_it_and_its_wait_says_so(tmp_path):
    """The fallback behind the up-front step (a fresh confirmation seed, a cache entry deleted
    mid-search): ``ensure_phase1`` trains the key, once, in a phase-1 run of its own."""
    from mlflow import MlflowClient

    from tune import tracking as mt
    from tune.config.plan import Plan
    from tune.search import parse_args
    from tune.trial.phase1 import ensure_phase1
    from tune.trial.setup import SearchSetup, build_model

    plan = Plan(parse_args(["--study", "prompt_pool", "--set", "phase1.epochs=1", "--storage", str(tmp_path)]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = mt.experiment_id(client, "cache-test", uri)
    setup = SearchSetup(
        "smoke", plan.profile, plan.manifest_hash, str(tmp_path), str(tmp_path / "cache"), uri, exp, "", ("val_acc",)
    )
    waits = []
    for _ in range(2):
        model, _ = build_model(setup, {}, plan.data, 0)
        key, waited = ensure_phase1(setup, model, plan.data, 0, client, log=lambda m: None)
        waits.append(waited)
    assert waits[0] > 0 and waits[1] == 0.0
    runs = client.search_runs([exp], "tags.`lpt.role` = 'phase1'")
    assert len(runs) == 1 and runs[0].data.tags["lpt.phase1_key"] == key and runs[0].info.status == "FINISHED"


def test_the_key_holds_the_datas_image_size_and_the_head_dropout_the_model_trains_with(tmp_path):
    """On CIFAR the manifest names the same rows at 224 and 192 px, so the key needs image_size of
    its own; a trial (or a confirmation) whose model has another head_dropout than the profile's
    trains another phase 1, so its key is its model's."""
    from test_data_cifar import shuffled_labels, write_cifar100

    from lpt_core.data.manifest import manifest_hash
    from tune.config.loading import load_profile, profile_data
    from tune.trial.phase1 import profile_phase1_key

    root = write_cifar100(tmp_path / "cifar", shuffled_labels(5, 30), shuffled_labels(5, 4, 1))

    def key(size, **kw):
        profile = load_profile("smoke", [])[1]
        profile["data"] = {"name": "cifar100_lt", "root": str(root), "imbalance_ratio": 10, "image_size": size}
        data = profile_data(profile)
        return manifest_hash(data), profile_phase1_key(profile, manifest_hash(data), 5, data, 0, "cpu", **kw)

    (hash_32, base), (hash_48, other_size) = key(32), key(48)
    assert hash_32 == hash_48 and base != other_size  # same images, another size: another phase 1
    assert key(32, head_dropout=0.1)[1] == base  # the profile's value (the smoke profile's default 0.1)
    assert key(32, head_dropout=0.3)[1] != base
