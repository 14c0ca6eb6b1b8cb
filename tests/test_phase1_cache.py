"""Phase-1 cache: one training per key across Ray tasks, through the cluster's lease table (one
clock, heartbeats); a stale lease is taken over by exactly one asker; only the owner releases; a
crash leaves a resume state and costs at most one more training, never a wrong entry."""

import os
import time

import pytest
import ray

from lpt_core.config import PhaseConfig
from tune.names import PHASE1_INFO, PHASE1_PROMPTS, PHASE1_STATE
from tune.phase1.cache import Phase1Cache
from tune.phase1.leases import ACTOR_NAME, ACTOR_NAMESPACE, Leases, LeaseTable, lease_table


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_one_owners_until_it_goes_stale_on_the_tables_clock():
    clock = Clock()
    table = LeaseTable(stale_after_s=60, clock=clock)
    assert table.acquire("k", "a") and not table.acquire("k", "b")
    clock.now = 59
    assert table.renew("k", "a") and not table.renew("k", "b")
    clock.now = 118  # 59 s after the last beat: still alive
    assert not table.acquire("k", "b")
    clock.now = 120  # 61 s: stale, and exactly one asker gets it
    assert table.acquire("k", "b") and not table.acquire("k", "c")
    assert table.stats() == {"held": 1, "takeovers": 1}
    assert not table.renew("k", "a")  # the old owner learns it lost the lease
    table.release("k", "a")  # not its own: nothing happens
    assert table.holder("k") == "b"
    table.release("k", "b")
    assert table.holder("k") is None and table.acquire("k", "c")


def test_without_ray_the_cache_uses_a_table_of_its_own(tmp_path):
    if ray.is_initialized():
        pytest.skip("a Ray of another test is running in this process")
    calls = []

    def train(folder):
        calls.append(folder)
        (folder / PHASE1_PROMPTS).write_bytes(b"x")
        return {"n": 1}

    cache = Phase1Cache(tmp_path)
    assert cache.get_or_train("k", train)[1] and not cache.get_or_train("k", train)[1]
    assert len(calls) == 1 and cache.ready("k") and cache.info("k") == {"n": 1}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    lease_table(stale_after_s=3.0)  # the cluster's table, made with a short stale limit for these tests
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _contend(root: str, key: str, train_s: float) -> tuple[str, bool, int]:
    def train(folder) -> dict:
        time.sleep(train_s)
        (folder / PHASE1_PROMPTS).write_bytes(b"prompts")
        return {"by": os.getpid()}

    path, trained = Phase1Cache(root, poll_s=0.05, heartbeat_s=0.2).get_or_train(key, train, log=lambda m: None)
    return str(path), trained, os.getpid()


def test_concurrent_tasks_train_a_key_once(local_ray, tmp_path):
    root = str(tmp_path / "cache")
    outcomes = ray.get([_contend.remote(root, "k1", 4.0) for _ in range(3)])  # longer than the stale limit
    assert sorted(t for _, t, _ in outcomes) == [False, False, True]
    assert {p for p, _, _ in outcomes} == {str(tmp_path / "cache" / "k1" / PHASE1_PROMPTS)}
    trainer = next(pid for _, t, pid in outcomes if t)
    assert Phase1Cache(root).info("k1") == {"by": trainer}  # the heartbeats kept the lease past 3 s
    entry = tmp_path / "cache" / "k1"
    assert sorted(p.name for p in entry.iterdir()) == [PHASE1_INFO, PHASE1_PROMPTS]  # no lock file, no temporary
    actor = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
    assert ray.get(actor.stats.remote())["held"] == 0


@ray.remote(num_cpus=0, max_retries=0)
def _crash_mid_phase1(root: str, key: str) -> None:
    def train(folder):
        (folder / PHASE1_STATE).write_bytes(b"epoch 1")
        os._exit(1)  # killed mid-phase 1: its lease is never released, its resume state stays

    Phase1Cache(root, heartbeat_s=0.2).get_or_train(key, train, log=lambda m: None)


def test_a_crash_mid_phase1_costs_one_stale_wait_and_resumes_from_its_state(local_ray, tmp_path):
    with pytest.raises(ray.exceptions.RayError):
        ray.get(_crash_mid_phase1.remote(str(tmp_path), "k4"))
    assert Leases().holder("k4") is not None  # the dead owner's lease, until it goes stale
    resumed_from, waits = [], []

    def train(folder):
        resumed_from.append((folder / PHASE1_STATE).read_bytes())
        (folder / PHASE1_PROMPTS).write_bytes(b"x")
        return {}

    started = time.monotonic()
    path, trained = Phase1Cache(tmp_path, poll_s=0.05).get_or_train("k4", train, log=waits.append)
    assert trained and resumed_from == [b"epoch 1"]
    assert time.monotonic() - started < 30 and waits == ["phase 1 k4: another process is training it; waiting"]
    assert Leases().holder("k4") is None


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
    phase1 = load_profile("smoke")[1].phase1.model_dump()
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
    from tune.config.study import ProfileConfig
    from tune.trial.phase1 import profile_phase1_key

    root = write_cifar100(tmp_path / "cifar", shuffled_labels(5, 30), shuffled_labels(5, 4, 1))

    def key(size, **kw):
        cifar = {"name": "cifar100_lt", "root": str(root), "imbalance_ratio": 10, "image_size": size}
        profile = ProfileConfig.model_validate({**load_profile("smoke", [])[1].to_dict(), "data": cifar})
        data = profile_data(profile)
        return manifest_hash(data), profile_phase1_key(profile, manifest_hash(data), 5, data, 0, "cpu", **kw)

    (hash_32, base), (hash_48, other_size) = key(32), key(48)
    assert hash_32 == hash_48 and base != other_size  # same images, another size: another phase 1
    assert key(32, head_dropout=0.1)[1] == base  # the profile's value (the smoke profile's default 0.1)
    assert key(32, head_dropout=0.3)[1] != base
