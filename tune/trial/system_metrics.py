"""A trial run's utilisation, as MLflow's system metrics: sampled on a thread of the trial's process
(MLflow's ``SystemMetricsMonitor``) every ``system_metrics_interval()`` seconds and logged to the
trial's run as ``system/...``:

- the node: ``cpu_utilization_percentage``, ``system_memory_usage_megabytes`` and
  ``system_memory_usage_percentage`` (MLflow's CPU monitor; the run's ``lpt.node`` tag names the
  Ray node they were sampled on);
- the trial itself: ``trial_cpu_percentage`` (its process and its loader workers; 100 = one core
  busy) and ``trial_memory_megabytes`` (their resident memory);
- the trial's own GPUs, never the node's others: ``gpu_<k>_utilization_percentage``,
  ``gpu_<k>_memory_usage_percentage`` / ``_megabytes`` and ``gpu_<k>_power_usage_*`` for the k-th
  GPU Ray gave the trial (``lpt.gpu_ids`` names them), found in NVML by the UUID CUDA gives each
  visible device. A trial without a GPU samples none.

Each sample is the mean over the interval before it; the last one is taken when the trial ends, so
a trial shorter than the interval still has one. ``LPT_SYSTEM_METRICS_S`` sets the interval
(default 10 s; 0 turns the metrics off); MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, when
set, wins as in MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psutil
from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from tune.config.checks import system_metrics_interval

_log = logging.getLogger(__name__)


class TrialProcessMonitor(BaseMetricsMonitor):
    """CPU and resident memory of this process and its children (the loader workers)."""

    def __init__(self):
        super().__init__()
        self.me = psutil.Process()
        self.seen: dict[int, psutil.Process] = {}
        self._processes()  # prime cpu_percent: each process's first call only starts its clock

    def _processes(self) -> list[psutil.Process]:
        alive = []
        for proc in [self.me, *self.me.children(recursive=True)]:
            proc = self.seen.setdefault(proc.pid, proc)
            try:
                proc.cpu_percent()
                alive.append(proc)
            except psutil.Error:
                self.seen.pop(proc.pid, None)
        return alive

    def collect_metrics(self):
        cpu, rss = 0.0, 0
        for proc in list(self.seen.values()):
            try:
                cpu += proc.cpu_percent()
                rss += proc.memory_info().rss
            except psutil.Error:
                self.seen.pop(proc.pid, None)
        self._processes()  # workers started since the last sample are counted from the next one
        self._metrics["trial_cpu_percentage"].append(cpu)
        self._metrics["trial_memory_megabytes"].append(rss / 1e6)

    def aggregate_metrics(self):
        return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items()}


def visible_gpu_uuids() -> list[str]:
    """NVML's names (``GPU-<uuid>``) of the GPUs this process sees (Ray sets
    ``CUDA_VISIBLE_DEVICES`` to the trial's): CUDA's indices and NVML's need not agree, UUIDs do."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


def own_gpu_handles(gpu_ids: list, uuids: list[str], handle_of: Callable[[str], object]) -> list:
    """NVML handles of the trial's GPUs only: none for a trial Ray gave no GPU (whatever the node
    has), else the handle of each GPU the process sees (``uuids``, through ``handle_of``)."""
    return [handle_of(uuid) for uuid in uuids] if gpu_ids else []


def own_gpu_monitor(gpu_ids: list) -> BaseMetricsMonitor | None:
    """MLflow's NVIDIA monitor narrowed to the trial's GPUs; None without a GPU or without NVML."""
    if not gpu_ids:
        return None
    try:
        import pynvml
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitor = GPUMonitor()  # nvmlInit; its handles are every GPU of the node
        monitor.gpu_handles = own_gpu_handles(gpu_ids, visible_gpu_uuids(), pynvml.nvmlDeviceGetHandleByUUID)
        return monitor
    except Exception as exc:  # no NVML library or driver: CPU metrics only
        _log.warning("no GPU system metrics for this trial: %s", exc)
        return None


class _IntervalMonitor(SystemMetricsMonitor):
    """MLflow's monitor sampling at the end of each interval and once more when it stops (MLflow's
    own loop takes its first sample at once, a utilisation over no time at all, and drops the
    last), every point logged when it is taken, all on the monitor's thread (psutil measures the
    node's CPU per calling thread)."""

    def monitor(self):
        psutil.cpu_percent()  # the node's first sample measures from here (psutil keeps one clock per thread)
        while not self._shutdown_event.wait(self.sampling_interval):
            self.sample()
        self.sample()  # the last, partial interval (finish() sets the event)

    def sample(self) -> None:
        try:
            self.collect_metrics()
            self.publish_metrics(self.aggregate_metrics())
            self.mlflow_logger.flush()
        except Exception as exc:  # a trial's result never depends on its utilisation figures
            _log.warning("system metrics of run %s: a sample was not logged (%s)", self._run_id, exc)


class TrialSystemMetrics:
    """Samples a trial run's system metrics from ``start()`` to ``finish()``."""

    def __init__(self, run_id: str, tracking_uri: str, gpu_ids: list, interval: float | None = None):
        self.run_id, self.tracking_uri, self.gpu_ids = run_id, tracking_uri, list(gpu_ids)
        self.interval = system_metrics_interval() if interval is None else interval
        self.monitor: _IntervalMonitor | None = None

    def start(self) -> TrialSystemMetrics:
        if self.interval <= 0:
            return self
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per trial
        monitor = _IntervalMonitor(
            self.run_id, sampling_interval=self.interval, resume_logging=True, tracking_uri=self.tracking_uri
        )
        gpu = own_gpu_monitor(self.gpu_ids)
        monitor.monitors = [CPUMonitor(), TrialProcessMonitor(), *([gpu] if gpu else [])]
        monitor.start()
        self.monitor = monitor
        return self

    def finish(self) -> None:
        """Stop sampling; log one last sample (the time since the previous one)."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.finish()  # its thread takes the last sample before it ends
