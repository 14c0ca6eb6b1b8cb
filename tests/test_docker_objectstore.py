"""The Docker stack with nodes that share no folder: docker-compose.yml with
docker-compose.objectstore.yml and the S3 stand-in (profile "s3"), built and run in Docker.

It reuses tests/test_docker.py's daemon, base images and project image (the daemon's layer cache:
seconds when that test ran before), builds the stand-in's image (docker/s3/Dockerfile on the same
base image), then brings the stack up with two workers and
LPT_STORAGE=s3://lpt/runs?endpoint_override=s3:9000&scheme=http.

Checks:
- no writable mount is common to two Ray containers (head, workers, the driver while it runs), as
  `docker inspect` shows them; no Ray container mounts the volume `shared`; each container mounts
  exactly the secrets cluster_fixtures.SECRETS gives it (the key pair on every Ray node, none on
  the stand-in) and no secret value shows in `docker inspect`.
- a short smoke search from the driver container with no --storage (LPT_STORAGE) ends 0; the
  bucket holds its objects (search.json, trials.parquet, the trials' prompt files, the report,
  Tune's experiment state and checkpoints, the phase-1 cache); trials.parquet has every trial;
  the parent run's lpt.storage tag is the search folder's URI; no object holds the key pair.
Everything is torn down (`down -v`); the images stay.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import test_docker
from cluster_fixtures import ROOT, SECRETS, free_port, login_to_mlflow
from test_docker import Stack, mounted_secrets, sh, timed

# tests/test_docker.py's daemon, base images and project image, as fixtures of this module too
engine, base_images, image = test_docker.engine, test_docker.base_images, test_docker.image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

OVERRIDE = "docker-compose.objectstore.yml"
S3_IMAGE = "lpt-s3:test"
BUCKET, PREFIX = "lpt", "runs"
STORAGE = f"s3://{BUCKET}/{PREFIX}?endpoint_override=s3:9000&scheme=http"
WORKERS = 2
TRIALS = 2
RAY_SERVICES = ("ray-head", "ray-worker", "driver")
SEARCH = (
    "python",
    "tune/search.py",
    "--study",
    "prompt_pool",
    "--profile",
    "smoke",
    "--trials",
    str(TRIALS),
    "--set",
    "phase1.epochs=1",
    "--set",
    "phase2.epochs=2",
)
SEARCH_TIMEOUT_S = 900


class ObjectStoreStack(Stack):
    """Stack with the override and the S3 stand-in: its own project, the bucket's port on loopback."""

    def __init__(self, workdir: Path, image_name: str, base_images: dict[str, str]):
        super().__init__(workdir, image_name, base_images)
        shutil.copy(ROOT / OVERRIDE, workdir / OVERRIDE)
        self.s3_port = free_port()
        with open(workdir / ".env", "a") as env:
            env.write(f"LPT_STORAGE={STORAGE}\nLPT_S3_IMAGE={S3_IMAGE}\nS3_PORT={self.s3_port}\n")
        self.project = f"lpts3{os.getpid()}"
        self.compose = [
            "docker-compose",
            "-p",
            self.project,
            "--project-directory",
            workdir,
            "-f",
            workdir / "docker-compose.yml",
            "-f",
            workdir / OVERRIDE,
            "--profile",
            "s3",
        ]

    def key_pair(self) -> tuple[str, str]:
        config = configparser.ConfigParser()
        config.read_string(self.secrets["aws_credentials"])
        return config["default"]["aws_access_key_id"], config["default"]["aws_secret_access_key"]

    def bucket(self):
        """The stand-in's bucket as the host sees it (its loopback port), with the stack's key pair."""
        from pyarrow import fs

        key, secret = self.key_pair()
        return fs.S3FileSystem(
            access_key=key,
            secret_key=secret,
            endpoint_override=f"127.0.0.1:{self.s3_port}",
            scheme="http",
            region="us-east-1",
        )


@pytest.fixture(scope="module")
def stack(image, base_images, tmp_path_factory):
    stack = ObjectStoreStack(tmp_path_factory.mktemp("docker-s3-stack"), image, base_images)
    login = login_to_mlflow(stack.secrets)
    login.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{stack.mlflow_port}")
    started = time.time()
    try:
        sh(  # as `docker compose build s3` does it, from the checkout
            [
                "docker",
                "build",
                "-f",
                ROOT / "docker" / "s3" / "Dockerfile",
                "--build-arg",
                f"PYTHON_IMAGE={base_images['PYTHON_IMAGE']}",
                "-t",
                S3_IMAGE,
                ROOT,
            ],
            timeout=1200,
        )
        timed("s3 image build", started)
        started = time.time()
        stack.run("up", "-d", "--no-build", "--scale", f"ray-worker={WORKERS}", timeout=600)
        stack.wait_healthy(("postgres", "mlflow", "ray-head", "s3"))
        stack.wait_setup()
        nodes = stack.nodes(alive=1 + WORKERS)
        assert sum(n["alive"] for n in nodes) == 1 + WORKERS, f"{nodes}\n{stack.logs()}"
        timed("object-store stack up", started)
        yield stack
    finally:
        try:
            stack.run("down", "-v", "--timeout", "20", timeout=300, check=False)
        finally:
            login.undo()


def writable_mounts(stack: Stack, container: str) -> set[tuple[str, str]]:
    """(type, volume name or host path) of each writable mount of a container."""
    return {(m["Type"], m.get("Name") or m["Source"]) for m in stack.inspect(container)["Mounts"] if m.get("RW", False)}


def mount_lines(stack: Stack, containers: list[str]) -> list[str]:
    """What `docker inspect` says of each container's mounts, one line each (the closing note's evidence)."""
    lines = []
    for container in containers:
        info = stack.inspect(container)
        for m in info["Mounts"]:
            source = m.get("Name") or m["Source"]
            lines.append(
                f"{info['Name']:<32} {m['Destination']:<34} {m['Type']:<6} {'rw' if m.get('RW') else 'ro'} {source}"
            )
    return lines


def assert_nothing_writable_in_common(stack: Stack, containers: list[str]) -> None:
    mounts = {c: writable_mounts(stack, c) for c in containers}
    for i, a in enumerate(containers):
        for b in containers[i + 1 :]:
            common = mounts[a] & mounts[b]
            assert not common, f"{stack.inspect(a)['Name']} and {stack.inspect(b)['Name']} both write {common}"
    shared = f"{stack.project}_shared"
    for container in containers:
        names = {m.get("Name") for m in stack.inspect(container)["Mounts"]}
        assert shared not in names, f"{stack.inspect(container)['Name']} mounts the volume shared"


def secret_values(stack: ObjectStoreStack) -> list[str]:
    return [*test_docker.secret_values(stack.secrets), *stack.key_pair()]


def test_no_ray_container_shares_a_writable_folder(stack):
    """`docker inspect`: each Ray container's writable mounts are its own (its /shared an
    anonymous volume), /data read-only; the key pair mounted on every Ray node as a secret file and
    on nothing else; no secret value anywhere in `docker inspect`."""
    ray = [c for s in RAY_SERVICES for c in stack.containers(s)]
    assert len(ray) == 1 + WORKERS
    assert_nothing_writable_in_common(stack, ray)
    for container in ray:
        dests = {m["Destination"]: m for m in stack.inspect(container)["Mounts"]}
        assert dests["/shared"]["Type"] == "volume" and dests["/shared"]["RW"]
        assert dests["/data"]["RW"] is False
        env = dict(e.split("=", 1) for e in stack.inspect(container)["Config"]["Env"])
        assert env["LPT_STORAGE"] == STORAGE
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/lpt-secrets/aws_credentials"
    for container in stack.containers(every=True):
        service = stack.service_of(container)
        assert mounted_secrets(stack, container) == SECRETS[service], service
    for container in stack.containers("s3"):
        assert stack.inspect(container)["Config"]["User"] == "s3"  # the stand-in is not root either
    for value in secret_values(stack):
        for container in stack.containers(every=True):
            assert value not in json.dumps(stack.inspect(container)), f"{stack.service_of(container)}: a secret"
    print("[docker s3 test] docker inspect, mounts:\n" + "\n".join(mount_lines(stack, ray)), flush=True)


@pytest.fixture(scope="module")
def search(stack):
    """The driver container's short smoke search on the bucket (LPT_STORAGE; no --storage),
    started detached so that its mounts are inspected while it runs beside the nodes."""
    assert stack.containers("s3"), "the S3 stand-in is not running"
    name = f"{stack.project}-driver"
    started = time.time()
    stack.run("run", "-d", "--name", name, "driver", *SEARCH, timeout=300)
    try:
        ray = [c for s in ("ray-head", "ray-worker") for c in stack.containers(s)]
        driver = sh(["docker", "inspect", "-f", "{{.Id}}", name], timeout=60).stdout.strip()
        assert_nothing_writable_in_common(stack, [*ray, driver])
        driver_mounts = mount_lines(stack, [driver])
        assert mounted_secrets(stack, driver) == SECRETS["driver"]
        code = sh(["docker", "wait", name], timeout=SEARCH_TIMEOUT_S).stdout.strip()
        logs = sh(["docker", "logs", name], timeout=120)
        output = logs.stdout + logs.stderr
    finally:
        sh(["docker", "rm", "-f", "-v", name], timeout=120, check=False)
    timed("object-store search", started)
    return {"returncode": int(code), "output": output, "driver_mounts": driver_mounts, "wall_s": time.time() - started}


def test_a_search_with_its_storage_in_the_bucket(stack, search):
    """The search ends 0 with every trial; the bucket holds what it keeps; the parent run names
    the search folder's URI; no object holds the key pair."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from pyarrow import fs

    output = search["output"]
    assert search["returncode"] == 0, f"the search failed ({search['returncode']}):\n{output[-6000:]}"
    print("[docker s3 test] the driver's mounts:\n" + "\n".join(search["driver_mounts"]), flush=True)
    bucket = stack.bucket()
    listed = bucket.get_file_info(fs.FileSelector(f"{BUCKET}/{PREFIX}", recursive=True))
    objects = sorted(i.path[len(f"{BUCKET}/{PREFIX}/") :] for i in listed if i.type == fs.FileType.File)
    searches = {p.split("/", 1)[0] for p in objects if p.startswith("prompt_pool-smoke-")}
    assert len(searches) == 1, objects
    [folder] = searches
    mine = [p[len(folder) + 1 :] for p in objects if p.startswith(f"{folder}/")]
    for needed in ("search.json", "trials.parquet", "profile.yaml"):
        assert needed in mine, (needed, mine)
    assert [p for p in mine if p.startswith("report/")], mine
    assert [p for p in mine if re.search(r"(^|/)experiment_state-[^/]+\.json$", p)], mine
    assert [p for p in mine if re.search(r"/checkpoint_[^/]+/", p)], mine
    cache = [p for p in objects if p.startswith("phase1-cache/")]
    keys = {p.split("/")[1] for p in cache}
    assert keys and all(f"phase1-cache/{k}/prompts.safetensors" in cache for k in keys), cache
    assert all(f"phase1-cache/{k}/info.json" in cache for k in keys), cache
    with bucket.open_input_file(f"{BUCKET}/{PREFIX}/{folder}/trials.parquet") as f:
        rows = pq.read_table(f).to_pylist()
    assert len(rows) == TRIALS and {r["status"] for r in rows} <= {"completed", "early_stopped"}, rows
    # a prompt file for each trial that ran every epoch (ASHA may stop one early)
    prompts = {p for p in mine if re.fullmatch(r"prompts/[^/]+\.safetensors", p)}
    assert prompts == {f"prompts/{r['trial_id']}.safetensors" for r in rows if r["status"] == "completed"}, mine
    assert prompts, rows
    with bucket.open_input_stream(f"{BUCKET}/{PREFIX}/{folder}/search.json") as f:
        record = json.loads(f.read())
    tags = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}").get_run(record["parent_run_id"]).data.tags
    assert tags["lpt.storage"].startswith(f"s3://{BUCKET}/{PREFIX}/{folder}") and "s3:9000" in tags["lpt.storage"]
    secrets = secret_values(stack)
    assert not [s for s in secrets if s in json.dumps(tags)], "a secret in the parent run's tags"
    for path in objects:  # the key pair (and every other secret) in no object: Tune's pickled state included
        with bucket.open_input_stream(f"{BUCKET}/{PREFIX}/{path}") as f:
            data = f.read()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path} holds a secret"
    print(
        f"[docker s3 test] search {folder}: {len(objects)} objects, {search['wall_s']:.0f} s; "
        f"objects:\n" + "\n".join(objects),
        flush=True,
    )
