"""Phase 1 up front (``tune.engine.phase1_upfront``) without a whole search: the driver's step as Ray
tasks on a real local Ray (one CPU), with the tiny profile, a real MLflow store and the real phase-1
cache; then what each trial does with it (``tune.trial.phase1.ensure_phase1``)."""

import sys
import time

import pytest
import ray
import yaml
from mlflow import MlflowClient
from tiny_profile import SMALL_SYNTHETIC, tiny_profile

from tune import tracking as mt
from tune.config.plan import Plan
from tune.engine.phase1_upfront import UPFRONT_METRIC, phase1_keys, train_up_front
from tune.engine.tuner import on_resources
from tune.names import PHASE1_CACHE
from tune.search import parse_args
from tune.trial.phase1 import ensure_phase1, wait_metrics
from tune.trial.setup import SearchSetup, build_model

LENGTHS = [2, 4]  # the tiny profile's own 4 among them: the baseline trial's


@pytest.fixture(scope="module")
def local_ray():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def plan_and_setup(tmp_path) -> tuple[Plan, SearchSetup, MlflowClient]:
    """A search of two prompt lengths on the tiny profile, as the driver has it before phase 1:
    the plan, its parent run and the setup every trial and phase-1 task gets."""
    profile = tiny_profile(
        SMALL_SYNTHETIC,
        phase1={"epochs": 1, "batch_size": 8, "warmup": "step"},
        phase2={"epochs": 1, "batch_size": 8, "warmup": "step"},
        device="cpu",
        resources={"cpu": 1, "gpu": 0},
        loader={"num_workers": 0, "eval_batch_size": 50},
    )
    study = {"early_stopping": {"enabled": False}, "space": {"prompt_length": {"type": "choice", "values": LENGTHS}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(profile))
    (tmp_path / "lengths.yaml").write_text(yaml.safe_dump(study))
    argv = ["--study", str(tmp_path / "lengths.yaml"), "--profile", str(tmp_path / "tiny.yaml")]
    plan = Plan(parse_args([*argv, "--trials", "4", "--storage", str(tmp_path / "runs")]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = mt.experiment_id(client, "lengths", uri)
    parent = client.create_run(exp).info.run_id
    cache = (plan.storage / PHASE1_CACHE).uri
    setup = SearchSetup("tiny", plan.profile, plan.manifest_hash, str(tmp_path), cache, uri, exp, parent, ("val_acc",))
    return plan, setup, client


def test_every_phase1_is_trained_once_up_front_and_the_trials_only_read_it(tmp_path, local_ray, capsys):
    """What a whole search of two prompt lengths used to show (in tests/test_search_e2e.py): one
    Ray task per prompt length before any trial, each its own finished phase-1 run; the parent run
    holds the step's seconds; every trial finds its key ready, waits 0 s (so logs no wait) and
    reuses the cached prompts; a second search on the same storage trains none."""
    plan, setup, client = plan_and_setup(tmp_path)
    keys = phase1_keys(plan)
    assert sorted(keys) == LENGTHS and len(set(keys.values())) == 2

    seconds, task_seconds = train_up_front(plan, setup, client, on_resources)
    out = capsys.readouterr().out
    assert "phase 1 up front: 2 configs (prompt_length 2, 4), 0 cached, 2 to train as Ray tasks" in out
    assert "phase 1 prompt_length 2 ready" in out and "phase 1 prompt_length 4 ready" in out
    assert seconds > 0 and task_seconds > 0
    assert client.get_run(setup.parent_run_id).data.metrics[UPFRONT_METRIC] == pytest.approx(seconds)
    phase1 = client.search_runs([setup.experiment_id], "tags.`lpt.role` = 'phase1'")
    assert sorted(r.data.params["prompt_length"] for r in phase1) == ["2", "4"]
    assert all(r.info.status == "FINISHED" for r in phase1)
    assert {r.data.params["prompt_length"]: r.data.tags["lpt.phase1_key"] for r in phase1} == {
        str(n): key for n, key in keys.items()
    }

    trials_start = time.time() * 1000
    assert all(r.info.end_time <= trials_start for r in phase1)  # every phase 1 ended before a trial starts
    for n in [*LENGTHS, *LENGTHS]:  # four trials, as a search of 4 trials samples them
        said = []
        model, _ = build_model(setup, {"prompt_length": n}, plan.data, plan.profile.seed)
        key, waited = ensure_phase1(setup, model, plan.data, plan.profile.seed, client, said.append)
        assert key == keys[n] and waited == 0.0 and wait_metrics(waited) == {}  # no wait: no phase1_wait_s
        assert said == [f"phase 1 {key}: reusing cached prompts"]
    assert len(client.search_runs([setup.experiment_id], "tags.`lpt.role` = 'phase1'")) == 2  # none trained

    again = train_up_front(plan, setup, client, on_resources)
    assert "phase 1 up front: 2 configs (prompt_length 2, 4), 2 cached, 0 to train" in capsys.readouterr().out
    assert again[1] == 0.0 and len(client.search_runs([setup.experiment_id], "tags.`lpt.role` = 'phase1'")) == 2
