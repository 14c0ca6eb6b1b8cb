"""Phase-1 cache: one training per key across processes; a dead owner's lock is taken over."""

import multiprocessing as mp
import os
import time
from pathlib import Path

from tune.phase1_cache import LOCK, PROMPTS, Phase1Cache, phase1_key


def _worker(root: str, key: str, log_dir: str, results: str) -> None:
    def train(folder: Path) -> dict:
        (Path(log_dir) / f"trained-{os.getpid()}").touch()
        time.sleep(1.5)
        (folder / PROMPTS).write_bytes(b"prompts")
        return {"by": os.getpid()}
    path, trained = Phase1Cache(root, poll_s=0.1).get_or_train(key, train, log=lambda m: None)
    Path(results, f"{os.getpid()}").write_text(f"{path}|{trained}")


def test_concurrent_trials_train_phase1_once(tmp_path):
    logs, results = tmp_path / "logs", tmp_path / "results"
    logs.mkdir(), results.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), "k1", str(logs), str(results)))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(logs.iterdir())) == 1
    outcomes = [f.read_text().split("|") for f in results.iterdir()]
    assert sorted(t for _, t in outcomes) == ["False", "False", "True"]
    assert {p for p, _ in outcomes} == {str(tmp_path / "cache" / "k1" / PROMPTS)}
    assert Phase1Cache(tmp_path / "cache").info("k1")["by"] > 0
    assert not (tmp_path / "cache" / "k1" / LOCK).exists()


def test_stale_lock_of_a_dead_owner_is_taken_over(tmp_path, monkeypatch):
    import tune.phase1_cache as pc
    monkeypatch.setattr(pc, "STALE_AFTER_S", 0.5)
    cache = Phase1Cache(tmp_path, poll_s=0.05)
    lock = tmp_path / "k2" / LOCK
    lock.parent.mkdir()
    lock.write_text("{}")
    old = time.time() - 10
    os.utime(lock, (old, old))

    def train(folder):
        (folder / PROMPTS).write_bytes(b"x")
        return {}
    path, trained = cache.get_or_train("k2", train, log=lambda m: None)
    assert trained and path.read_bytes() == b"x"


def test_key_depends_on_what_phase1_depends_on():
    base = dict(backbone={"name": "vit"}, manifest_hash="abc", prompt_length=10, recipe={"epochs": 2}, seed=0)
    key = phase1_key(**base)
    assert key == phase1_key(**base)
    for change in (dict(manifest_hash="abd"), dict(prompt_length=5), dict(recipe={"epochs": 3}), dict(seed=1),
                   dict(backbone={"name": "vit", "weights": "x"})):
        assert phase1_key(**{**base, **change}) != key
