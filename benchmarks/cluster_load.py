"""Load on the compose stack's MLflow server and PostgreSQL: N concurrent MLflow clients logging as
the searches' user (`searcher`), each a ``log_batch`` of 40 metrics per second and one 5 MB
artifact per minute (``--artifact-period`` shortens it for quick runs), for a fixed time. Prints
p50/p99 latency per request kind, 5xx answers, retries and failed requests, and the peak
connections per PostgreSQL role sampled from ``pg_stat_activity``.

Against a running stack (the tracking URI and the login from MLflow's environment variables;
``--pg-dsn`` or ``LPT_BENCH_PG_DSN``, a superuser's libpq DSN, for the connection counts):

    MLFLOW_TRACKING_USERNAME=searcher MLFLOW_TRACKING_PASSWORD=... \\
        python benchmarks/cluster_load.py --tracking-uri http://localhost:5000 --clients 32 --duration 60

Or ``--local-stack``: PostgreSQL and ``mlflow server`` started here from docker-compose.yml's own
commands and settings (db-setup's roles and limits, mlflow-setup's user), as tests/test_cluster.py
starts them (tests/cluster_fixtures.py), and stopped at the end.

Each request is sent with the requests library (one keep-alive session per client), so that every
try is timed and counted: a 5xx, 429 or a connection error is retried up to ``RETRIES`` times with
back-off (0.5 s doubling), as MLflow's client would; a request that fails every try is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RETRIES = 5
RETRY_STATUS = {429, 500, 502, 503, 504}
TIMEOUT_S = 120


@dataclass
class Tally:
    """What the clients saw, per request kind."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"log_batch": [], "artifact": []})
    status_5xx: int = 0
    retries: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def send(session, tally: Tally, kind: str, method: str, url: str, **kwargs) -> bool:
    """One request with its retries; its latency (all tries, back-off included) into the tally."""
    import requests

    started, pause = time.monotonic(), 0.5
    for attempt in range(RETRIES + 1):
        reason = None
        try:
            resp = session.request(method, url, timeout=TIMEOUT_S, **kwargs)
            if resp.status_code >= 500:
                with tally.lock:
                    tally.status_5xx += 1
            if resp.status_code < 300:
                with tally.lock:
                    tally.latencies[kind].append(time.monotonic() - started)
                return True
            reason = f"{resp.status_code} {resp.text[:200]}"
            if resp.status_code not in RETRY_STATUS:
                break
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        if attempt < RETRIES:
            with tally.lock:
                tally.retries += 1
            time.sleep(pause)
            pause *= 2
    with tally.lock:
        tally.failed += 1
        if len(tally.errors) < 20:
            tally.errors.append(f"{kind}: {reason}")
    return False


def client(index: int, args, base: str, auth, run: tuple[str, str], tally: Tally, stop_at: float) -> None:
    """One client: a batch of metrics every ``--batch-period`` s, an artifact every ``--artifact-period`` s
    (the first at a point spread over the period, so that the clients do not upload together)."""
    import requests

    experiment_id, run_id = run
    session = requests.Session()
    session.auth = auth
    payload = os.urandom(int(args.artifact_mb * 1024 * 1024))
    next_batch = time.monotonic()
    next_artifact = next_batch + args.artifact_period * (index + 0.5) / args.clients
    step = 0
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        if now >= next_artifact:
            path = f"{experiment_id}/{run_id}/artifacts/load/blob-{step}.bin"
            send(session, tally, "artifact", "PUT", f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", data=payload)
            next_artifact += args.artifact_period
        elif now >= next_batch:
            stamp = int(time.time() * 1000)
            metrics = [
                {"key": f"m{k:02d}", "value": float(step * k), "timestamp": stamp, "step": step}
                for k in range(args.metrics)
            ]
            send(
                session,
                tally,
                "log_batch",
                "POST",
                f"{base}/api/2.0/mlflow/runs/log-batch",
                json={"run_id": run_id, "metrics": metrics},
            )
            step += 1
            next_batch += args.batch_period
        else:
            time.sleep(max(0.0, min(next_batch, next_artifact, stop_at) - now))
    session.close()


def sample_connections(dsn: str, peaks: dict, stop: threading.Event, period_s: float = 0.5) -> None:
    """The peak count of client connections per role in ``pg_stat_activity`` (this sampler's own
    connection left out)."""
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(
                    "SELECT usename, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() GROUP BY usename"
                )
                counts = {str(user): n for user, n in cur.fetchall()}
                for user, n in counts.items():
                    peaks[user] = max(peaks.get(user, 0), n)
                peaks["(total)"] = max(peaks.get("(total)", 0), sum(counts.values()))
                stop.wait(period_s)
    finally:
        conn.close()


def run_load(args, base: str, auth, dsn: str | None) -> dict:
    """Make the runs, run the clients for ``--duration`` s, and sum up."""
    from mlflow import MlflowClient

    tracking = MlflowClient(base)  # logs in from MLFLOW_TRACKING_USERNAME / _PASSWORD
    experiment_id = tracking.create_experiment(f"cluster-load-{uuid.uuid4().hex[:8]}")
    runs = [(experiment_id, tracking.create_run(experiment_id).info.run_id) for _ in range(args.clients)]
    tally, peaks, stop = Tally(), {}, threading.Event()
    sampler = threading.Thread(target=sample_connections, args=(dsn, peaks, stop), daemon=True) if dsn else None
    if sampler:
        sampler.start()
    started = time.monotonic()
    stop_at = started + args.duration
    threads = [
        threading.Thread(target=client, args=(i, args, base, auth, runs[i], tally, stop_at), daemon=True)
        for i in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.duration + TIMEOUT_S * (RETRIES + 1))
    elapsed = time.monotonic() - started
    stop.set()
    if sampler:
        sampler.join(10)
    for _, run_id in runs:
        tracking.set_terminated(run_id)
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "metrics_per_batch": args.metrics,
        "artifact_mb": args.artifact_mb,
        "artifact_period_s": args.artifact_period,
        "requests": {k: len(v) for k, v in tally.latencies.items()},
        "p50_ms": {k: round(percentile(v, 50) * 1000, 1) for k, v in tally.latencies.items()},
        "p99_ms": {k: round(percentile(v, 99) * 1000, 1) for k, v in tally.latencies.items()},
        "status_5xx": tally.status_5xx,
        "retries": tally.retries,
        "failed": tally.failed,
        "errors": tally.errors,
        "peak_connections": dict(sorted(peaks.items())),
    }
    return result


def summary(result: dict) -> str:
    lat = " ".join(
        f"{k} n={result['requests'][k]} p50={result['p50_ms'][k]:.0f}ms p99={result['p99_ms'][k]:.0f}ms"
        for k in result["requests"]
    )
    conns = ", ".join(f"{role} {n}" for role, n in result["peak_connections"].items()) or "not sampled"
    return (
        f"N={result['clients']} {result['duration_s']:.0f}s: {lat}; 5xx {result['status_5xx']}, "
        f"retries {result['retries']}, failed {result['failed']}; peak connections: {conns}"
    )


def local_stack(workdir: Path):
    """PostgreSQL and the MLflow server from docker-compose.yml's commands, as tests/test_cluster.py
    starts them; returns the stack (``stop()`` it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_fixtures import LocalStack, postgres_unavailable

    reason = postgres_unavailable()
    if reason:
        raise SystemExit(f"--local-stack: {reason}")
    stack = LocalStack(workdir)
    try:
        stack.start_postgres()
        stack.start_mlflow()
        stack.wait_mlflow()
    except BaseException:
        stack.stop()
        raise
    return stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent MLflow clients (default 8)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--metrics", type=int, default=40, help="metrics per log_batch (default 40)")
    parser.add_argument("--batch-period", type=float, default=1.0, help="seconds between batches (default 1)")
    parser.add_argument("--artifact-mb", type=float, default=5, help="artifact size in MB (default 5)")
    parser.add_argument("--artifact-period", type=float, default=60, help="seconds between artifacts (default 60)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    parser.add_argument("--pg-dsn", default=os.environ.get("LPT_BENCH_PG_DSN", ""), help="a superuser's libpq DSN")
    parser.add_argument("--local-stack", action="store_true", help="start PostgreSQL + mlflow server here")
    parser.add_argument("--workdir", type=Path, help="--local-stack's folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.batch_period <= 0 or args.artifact_period <= 0:
        parser.error("--clients, --duration, --batch-period and --artifact-period must be positive")
    if not args.local_stack and not args.tracking_uri:
        parser.error("--tracking-uri (or MLFLOW_TRACKING_URI), or --local-stack")
    return args


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per run otherwise
    stack = None
    try:
        if args.local_stack:
            workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cluster-load-"))
            stack = local_stack(workdir)
            from cluster_fixtures import mlflow_login

            os.environ.update(mlflow_login(stack.secrets))
            base = stack.tracking_uri
            pg = stack.postgres
            dsn = f"host=127.0.0.1 port={pg.port} user={pg.user} password={pg.password} dbname={pg.database}"
        else:
            base, dsn = args.tracking_uri.rstrip("/"), args.pg_dsn or None
        auth = (os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        result = run_load(args, base, auth if auth[0] else None, dsn)
    finally:
        if stack is not None:
            stack.stop()
            if args.workdir is None:  # its artifacts: clients x 5 MB a minute
                shutil.rmtree(stack.workdir, ignore_errors=True)
    print(summary(result), flush=True)
    for line in result["errors"][:5]:
        print(f"  {line}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
