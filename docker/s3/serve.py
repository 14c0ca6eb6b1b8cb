"""The compose stack's S3 stand-in (service ``s3``, profile "s3"): moto's S3-compatible server,
the one Ray's own tests start for S3, on 0.0.0.0:$S3_PORT (9000), holding the buckets $S3_BUCKETS
names (comma-separated; made at each start, as a search refuses a missing bucket).

moto keeps every object in memory and accepts any key pair: a restart of the container loses the
searches. It is for trying the object-storage setting on one host and for the tests; on several
machines point LPT_STORAGE at a store of your own (S3, MinIO, Ceph RGW) instead.

``serve.py --check``: the health check, 0 once every bucket answers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import boto3
from moto.server import ThreadedMotoServer

PORT = int(os.environ.get("S3_PORT", "9000"))
BUCKETS = [b for b in os.environ.get("S3_BUCKETS", "lpt").split(",") if b]


def client():
    # the stand-in checks no signature: a fixed key pair, not the cluster's credentials file
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{PORT}",
        region_name="us-east-1",
        aws_access_key_id="stand-in",
        aws_secret_access_key="stand-in",
    )


def check() -> int:
    s3 = client()
    for bucket in BUCKETS:
        s3.head_bucket(Bucket=bucket)
    return 0


def serve() -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=PORT, verbose=False)
    server.start()
    s3 = client()
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)
    print(f"S3 stand-in on :{PORT}, buckets: {', '.join(BUCKETS)}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(check() if sys.argv[1:] == ["--check"] else serve())
