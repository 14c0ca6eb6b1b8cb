"""A trial run's system metrics (MLflow's monitor, narrowed to the trial): CPU and memory of the node
and of the trial's processes on a real MLflow store; the GPUs it samples are the trial's own."""

import multiprocessing
import time

import pytest
from mlflow import MlflowClient

from tune.config.checks import system_metrics_interval
from tune.errors import ConfigError
from tune.trial.system_metrics import TrialSystemMetrics, own_gpu_handles, own_gpu_monitor


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_trial_run_gets_cpu_and_memory_metrics_from_a_real_store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri())).info.run_id
    system = TrialSystemMetrics(run_id, client._tracking_client.tracking_uri, gpu_ids=[], interval=0.5).start()
    worker = multiprocessing.get_context("fork").Process(target=spin, args=(1.5,))  # a loader worker's stand-in
    worker.start()
    spin(1.5)
    worker.join()
    system.finish()
    metrics = client.get_run(run_id).data.metrics
    for name in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage",
        "system/trial_cpu_percentage",
        "system/trial_memory_megabytes",
    ):
        assert name in metrics, sorted(metrics)
    assert not any(k.startswith("system/gpu_") for k in metrics)  # a trial without a GPU samples none
    history = client.get_metric_history(run_id, "system/trial_cpu_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))
    # the trial's processes spun all along (on a machine shared with other work: well above idle)
    assert max(m.value for m in history) > 20.0
    node = [m.value for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    # every point measures an interval: the node was busy with this spinning process in each
    assert all(0.0 < v <= 100.0 for v in node), node


def test_a_trial_shorter_than_the_interval_still_gets_one_sample(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri())).info.run_id
    system = TrialSystemMetrics(run_id, client._tracking_client.tracking_uri, gpu_ids=[], interval=60).start()
    spin(0.3)
    system.finish()
    [point] = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert point.value > 0.0  # it measured the 0.3 s this process spun


def test_interval_zero_logs_nothing_and_a_bad_interval_is_named(tmp_path, monkeypatch):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri())).info.run_id
    monkeypatch.setenv("LPT_SYSTEM_METRICS_S", "0")
    TrialSystemMetrics(run_id, client._tracking_client.tracking_uri, gpu_ids=[]).start().finish()
    assert client.get_run(run_id).data.metrics == {}
    monkeypatch.delenv("LPT_SYSTEM_METRICS_S")
    assert system_metrics_interval() == 10.0
    for bad in ("ten", "-1", "inf", "nan"):
        monkeypatch.setenv("LPT_SYSTEM_METRICS_S", bad)
        with pytest.raises(ConfigError, match=f"^LPT_SYSTEM_METRICS_S={bad}: expected seconds"):
            system_metrics_interval()


def test_only_the_trials_own_gpus_are_sampled():
    handles = {"GPU-aaa": "handle-a", "GPU-bbb": "handle-b"}
    # Ray gave the trial no GPU: none, even on a node with GPUs this process could see
    assert own_gpu_handles([], list(handles), handles.__getitem__) == []
    assert own_gpu_monitor([]) is None
    # Ray gave it GPU 3 and set CUDA_VISIBLE_DEVICES=3: the process sees that one, found by UUID
    assert own_gpu_handles(["3"], ["GPU-bbb"], handles.__getitem__) == ["handle-b"]
