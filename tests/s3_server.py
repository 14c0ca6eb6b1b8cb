"""An S3-compatible server on loopback for the tests: moto's server (what Ray's own test utilities
start), standing in for the S3 / MinIO / Ceph RGW / GCS a user brings. The nodes read its
credentials from a standard AWS shared-credentials file, never from arguments."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass
class S3Server:
    server: object
    endpoint: str  # host:port
    credentials: Path  # the shared-credentials file (AWS_SHARED_CREDENTIALS_FILE)
    secret: str  # its secret access key, for tests that look for it where it must not be

    def uri(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def env(self) -> dict:
        return {"AWS_SHARED_CREDENTIALS_FILE": str(self.credentials), "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, bucket: str) -> None:
        import boto3

        key_id, secret = "lpt-test-key", self.secret
        boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        ).create_bucket(Bucket=bucket)

    def stop(self) -> None:
        self.server.stop()


def start_s3(folder: Path, ip: str = "127.0.0.1") -> S3Server:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address=ip, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    secret = "lpt-secret-" + secrets.token_hex(12)
    credentials = Path(folder) / "aws-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = lpt-test-key\naws_secret_access_key = {secret}\n")
    credentials.chmod(0o600)
    return S3Server(server, f"{host}:{port}", credentials, secret)
