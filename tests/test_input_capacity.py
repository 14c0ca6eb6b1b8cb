"""The dry run's input capacity: a trial's cores x the per-core decode rate against what its GPU
consumes, and the data-bound warning with the knobs."""

import pytest

from tune.config import input_capacity as ic
from tune.config.study import ProfileConfig
from tune.search import main

PLACES = {
    "data": {
        "name": "places_lt",
        "root": "/d",
        "train_list": "t",
        "val_list": "v",
        "test_list": "s",
        "gpu_decode": False,
    },
    "backbone": {"name": "vit_base_patch16_224"},
    "loader": {"num_workers": 8, "decode_per_core": None},
    "resources": {"cpu": 8, "gpu": 1},
    "images_per_s": None,
}


def with_(profile: dict, **sections) -> ProfileConfig:
    return ProfileConfig.model_validate(
        {**profile, **{k: {**profile[k], **v} if isinstance(v, dict) else v for k, v in sections.items()}}
    )


def test_capacity_is_cores_times_the_per_core_rate_against_the_gpu():
    line, advice = ic.capacity_lines(with_(PLACES))
    cap = 8 * ic.DECODE_PER_CORE
    assert line.startswith(f"input capacity per trial: 8 cores x {ic.DECODE_PER_CORE:,.0f} img/s (JPEG decode")
    assert f"= {cap:,.0f} img/s against the {ic.GPU_IMAGES_PER_S:,.0f} img/s a trial consumes" in line
    assert cap < ic.GPU_IMAGES_PER_S  # the shipped defaults: 8 cores cannot feed a ViT-B/16 on an H200
    assert f"data-bound, the GPU would wait about {1 - cap / ic.GPU_IMAGES_PER_S:.0%} of each step" in line
    assert advice.startswith("  feed it faster: raise loader.num_workers (now 8) and resources.cpu per trial (now 8)")
    assert "data.gpu_decode: true" in advice


def test_an_overridden_rate_and_images_per_s_decide():
    fast = {**PLACES, "loader": {**PLACES["loader"], "decode_per_core": 500.0}, "images_per_s": 3000.0}
    [line] = ic.capacity_lines(with_(fast))
    assert "8 cores x 500 img/s (JPEG decode + train transform, loader.decode_per_core) = 4,000 img/s" in line
    assert line.endswith("against the 3,000 img/s a trial consumes (images_per_s): the data keeps up")
    # fewer workers than CPUs: the workers do the decoding
    [line, _] = ic.capacity_lines(with_(fast, loader={"num_workers": 2}))
    assert "2 cores x 500 img/s" in line and "(only 2 loader workers on 8 CPUs)" in line
    # half a GPU consumes half the benchmark's figure
    assert ic.consumption(with_(PLACES, resources={"gpu": 0.5}))[0] == ic.GPU_IMAGES_PER_S / 2


def test_on_device_decoding_says_what_the_cpu_would_give():
    [line] = ic.capacity_lines(with_(PLACES, data={"gpu_decode": True}))
    assert line.startswith("input capacity per trial: on the GPU (data.gpu_decode: true;")
    assert line.endswith("that would be data-bound")


def test_places_lt_dry_run_prints_the_input_capacity_line(capsys):
    assert main(["--study", "prompt_pool", "--profile", "places_lt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "input capacity per trial: on the GPU (data.gpu_decode: true" in out
    assert (
        main(["--study", "prompt_pool", "--profile", "places_lt", "--dry-run", "--set", "data.gpu_decode=false"]) == 0
    )
    out = capsys.readouterr().out
    assert "input capacity per trial: 8 cores x" in out and "data-bound, the GPU would wait about" in out


@pytest.mark.parametrize("value", ["0", "-5", "fast"])
def test_a_bad_rate_is_named(capsys, value):
    assert main(["--study", "prompt_pool", "--dry-run", "--set", f"loader.decode_per_core={value}"]) == 2
    err = capsys.readouterr().err
    assert "loader.decode_per_core" in err and len(err.splitlines()) == 1
