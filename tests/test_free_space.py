"""The free-space check before a search starts (``tune.config.disk_space``): a tiny minimum passes,
an impossible one refuses the search in one line (exit 2) naming the folder, what is free and what
is needed, before Ray starts or anything is recorded; ``--dry-run`` prints the figures."""

from __future__ import annotations

import re
import shutil

import pytest

from tune.config.disk_space import check_free_space, disks, ray_temp_dir
from tune.errors import ConfigError
from tune.search import main
from tune.storage import Location

ENVS = ("LPT_MIN_FREE_STORAGE_GB", "LPT_MIN_FREE_RAY_GB", "LPT_MIN_FREE_WORK_GB")


def test_ray_temp_dir_is_rays_own(monkeypatch):
    from ray._common.utils import get_default_ray_temp_dir

    for env in ({}, {"TMPDIR": "/var/tmp"}, {"TMPDIR": "/var/tmp", "RAY_TMPDIR": "/scratch"}):
        for name in ("TMPDIR", "RAY_TMPDIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert str(ray_temp_dir()) == get_default_ray_temp_dir()


def test_a_tiny_minimum_passes_and_an_impossible_one_names_the_folder(tmp_path, monkeypatch):
    storage = Location(tmp_path / "runs")  # not made yet: measured at tmp_path
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    for env in ENVS:
        monkeypatch.setenv(env, "0.000001")
    check_free_space(storage)
    free = shutil.disk_usage(tmp_path).free / 1024**3
    [disk] = disks(storage)  # both on one disk: it needs the sum
    assert [n.what for n in disk.needs] == ["the search storage", "Ray's temp folder"]  # a local storage: no work dir
    assert disk.need_gib == pytest.approx(0.000002) and disk.free_gib == pytest.approx(free, rel=0.01)

    monkeypatch.setenv("LPT_MIN_FREE_STORAGE_GB", "1e9")
    with pytest.raises(ConfigError) as refused:
        check_free_space(storage)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"free space: {tmp_path / 'runs'} (the search storage) and ")
    assert re.search(r"share a disk with [0-9.]+ GiB free, 1e\+09 GiB needed; free some space, or lower ", line)
    assert "LPT_MIN_FREE_STORAGE_GB + LPT_MIN_FREE_RAY_GB" in line

    monkeypatch.setenv("LPT_MIN_FREE_RAY_GB", "0")  # 0: no check of that folder
    with pytest.raises(ConfigError, match=r"^free space: \S+ \(the search storage\) has [0-9.]+ GiB free, 1e\+09"):
        check_free_space(storage)


def test_object_storage_checks_the_work_dir_not_the_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("LPT_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("LPT_MIN_FREE_WORK_GB", "1e9")
    monkeypatch.setenv("LPT_MIN_FREE_RAY_GB", "0")
    with pytest.raises(ConfigError, match=rf"^free space: {tmp_path / 'work'} \(the work dir\) has .* 1e\+09 GiB"):
        check_free_space(Location("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http"))


def test_a_bad_minimum_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LPT_MIN_FREE_RAY_GB", "lots")
    with pytest.raises(ConfigError, match=r"^LPT_MIN_FREE_RAY_GB=lots: expected the free space to require, in GiB"):
        check_free_space(Location(tmp_path))


def test_the_cli_prints_free_space_and_refuses_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LPT_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--study", "prompt_pool", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"free space: {tmp_path / 'runs'} (the search storage) and {tmp_path / 'ray-tmp' / 'ray'}" in out
    assert "GiB free, 4 GiB needed (LPT_MIN_FREE_STORAGE_GB + LPT_MIN_FREE_RAY_GB)" in out
    assert "MLflow client: 7 retries" in out

    monkeypatch.setenv("LPT_MIN_FREE_RAY_GB", "1e9")
    assert main(["--study", "prompt_pool"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: free space: ") and "1e+09 GiB needed" in err and "\n" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ray-tmp").exists()  # nothing started
