"""The real CLI on a machine with neither the pretrained weights nor the data set, offline: a dry
run plans the search anyway; a search refuses at once, in one line, before Ray starts.

Offline here: HF_HUB_OFFLINE is not set, the Hugging Face hub's address is a local port nobody
listens on (HF_ENDPOINT), and the Hugging Face cache is an empty folder. Times are measured and
printed; the bounds are loose (this machine is shared and noisy), the point is "no minute of retries".
"""

import subprocess
import time

import yaml
from cluster_fixtures import free_port
from smoke_search import search_argv, search_env

from tune.config.loading import PROFILES_DIR


def offline_env(tmp_path) -> dict:
    env = search_env(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    env.pop("HF_HUB_OFFLINE")
    return env


def run_cli(tmp_path, *args, env=None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        search_argv(*args), cwd=tmp_path, env=env or offline_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    return proc, time.monotonic() - started


def test_a_dry_run_plans_without_the_weights_and_the_data(tmp_path):
    env = offline_env(tmp_path)
    proc, seconds = run_cli(tmp_path, "--study", "prompt_pool", "--profile", "cifar100_lt", "--dry-run", env=env)
    print(f"dry run without weights or data: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "data: cifar100_lt, 100 classes, 10,827 train / 2,000 val / 10,000 test images; manifest not computed" in out
    assert (
        f"not computed here: manifest hash: needs the images' pixels (data.root: {tmp_path}/data/cifar: no such "
        f"directory); sizes from the official files' 500 train / 100 test images per class"
    ) in out
    assert (
        f"backbone: vit_base_patch16_224.augreg_in21k (12 blocks), weights pretrained: not checked by a dry run; "
        f"a search takes them from timm/vit_base_patch16_224.augreg_in21k in the Hugging Face cache "
        f"{tmp_path}/hf-home/hub (else downloaded from {env['HF_ENDPOINT']})"
    ) in out
    assert "cost per trial: phase 2 trains 90 epochs x 43 steps x 2x256 = 1,981,440 images" in proc.stdout
    assert "Retrying" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    assert seconds < 60


def test_the_cifar10_lt_dry_run_validates_on_enough_images_to_decide(tmp_path):
    """Validation sized to decide: >= 1,500 images and one standard error <= 1 point at 90%, class 0
    validated on images held out of its training set (stated), without the data on the machine."""
    proc, _ = run_cli(tmp_path, "--study", "prompt_pool", "--profile", "cifar10_lt", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    [val] = [line for line in proc.stdout.splitlines() if line.startswith("validation: ")]
    assert val == (
        "validation: 2,000 images, 200 per class; 200 of class 0 held out of its training images (it trains "
        "on 4,800 of 5,000); one standard error of val_acc: ±0.7 points at 90%, ±1.1 at 50%"
    )
    assert "warning: one standard error" not in proc.stdout


def test_a_search_without_the_weights_fails_at_once_in_one_line(tmp_path):
    profile = yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())
    profile["backbone"] = {"name": "vit_base_patch16_224.augreg_in21k", "weights": "pretrained"}
    path = tmp_path / "vit_b.yaml"
    path.write_text(yaml.safe_dump(profile))
    proc, seconds = run_cli(tmp_path, "--study", "prompt_pool", "--profile", str(path))
    print(f"a search without the weights, offline: {seconds:.1f} s")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"error: {path}: backbone.weights: pretrained weights for vit_base_patch16_224.augreg_in21k "
        f"(timm/vit_base_patch16_224.augreg_in21k) are not on this machine and the Hugging Face hub "
        f"cannot be reached (127.0.0.1:"
    )
    assert line.endswith(
        "connection refused); download them where you are online (hf download "
        "timm/vit_base_patch16_224.augreg_in21k) into the Hugging Face cache, or set backbone.weights "
        "to a local weights file"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # before Ray, before MLflow
    assert seconds < 30


def test_a_search_without_the_data_still_refuses_before_ray(tmp_path):
    proc, _ = run_cli(
        tmp_path, "--study", "prompt_pool", "--profile", "cifar100_lt", "--set", "backbone.weights=random"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: {PROFILES_DIR}/cifar100_lt.yaml: data.root: {tmp_path}/data/cifar: no such directory"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
