"""Will the data keep up? Before a GPU is rented, the dry run sets a trial's input capacity (its cores
x what one core decodes and augments per second) against the images per second its GPU would
consume (the profile's ``images_per_s``, else the benchmark's phase-2 figure), and the knobs that
feed a trial faster. The per-core rates are defaults measured by ``benchmarks/input_pipeline.py``
(see benchmarks/README.md); ``loader.decode_per_core`` overrides them for a profile."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tune.config.study import ProfileConfig

# img/s one CPU core gives the training loop, by where the images come from. JPEG files: below what
# benchmarks/input_pipeline.py measured for TorchCodec decode + the train transform of 500x375
# JPEGs (705 per core, ImageNet's size; 1,128 at Places365's 256x256, 300 at iNat's 800x600) and
# about the published per-core rate for Places365 (about 390), since a loader worker also reads the
# file, collates the batch and ships it to the trainer. In-memory uint8 images (CIFAR, synthetic):
# the transform alone measured 2,865 per core; half of it for the same overheads.
DECODE_PER_CORE = 400.0
AUGMENT_PER_CORE = 1500.0
# img/s the GPU consumes when the profile gives no images_per_s: the lean bf16 phase-2 step of
# ViT-B/16 at 224 px on an H200 (benchmarks/README.md, the reference figures), per GPU
GPU_IMAGES_PER_S = 3336.0
FILE_DATASETS = ("places_lt", "imagenet_lt", "inat2018", "image_folder")


def knobs(profile: ProfileConfig | None = None) -> str:
    """What feeds a trial faster: more loader workers, more cores per trial, decoding (or
    augmenting) on the device; with a profile, its current values and only the device switch its
    dataset has (off)."""
    if profile is None:
        return "raise loader.num_workers and resources.cpu per trial, or set data.gpu_decode: true (image files)"
    data, workers, cpu = profile.data, profile.loader.num_workers, profile.resources.cpu
    device = next((k for k in ("gpu_decode", "gpu_augment") if getattr(data, k, None) is False), None)
    return f"raise loader.num_workers (now {workers}) and resources.cpu per trial (now {cpu:g})" + (
        f", or set data.{device}: true" if device else ""
    )


def per_core_rate(profile: ProfileConfig) -> tuple[float, str]:
    """img/s per core for this profile's data, and what it covers."""
    files = profile.data.name in FILE_DATASETS
    what = "JPEG decode + train transform" if files else "train transform of in-memory images"
    given = profile.loader.decode_per_core
    if given:
        return float(given), f"{what}, loader.decode_per_core"
    return (DECODE_PER_CORE if files else AUGMENT_PER_CORE), f"{what}, default"


def consumption(profile: ProfileConfig) -> tuple[float | None, str]:
    """img/s one trial's training step consumes, and where the figure comes from."""
    rate, gpu = profile.images_per_s, profile.resources.gpu
    if rate:
        return float(rate), "images_per_s"
    if gpu > 0:
        share = f" x {gpu:g} GPU" if gpu != 1 else ""
        return GPU_IMAGES_PER_S * gpu, f"ViT-B/16 phase 2 on an H200{share}, benchmarks/README.md; set images_per_s"
    return None, ""


def capacity_lines(profile: ProfileConfig) -> list[str]:
    """The dry run's input-capacity line, and a data-bound warning when the CPU's capacity is
    below the consumption (with ``gpu_decode`` / ``gpu_augment`` on, what the CPU would give)."""
    data, workers, cpu = profile.data, profile.loader.num_workers, profile.resources.cpu
    switch = next((k for k in ("gpu_decode", "gpu_augment") if getattr(data, k, False)), None)
    cores = min(cpu, max(workers, 1))  # the loader's workers do the work (the trial's own process when 0)
    rate, what = per_core_rate(profile)
    capacity = cores * rate
    need, source = consumption(profile)
    cpu_figure = (
        f"{cores:g} {'core' if cores == 1 else 'cores'} x {rate:,.0f} img/s ({what}) = {capacity:,.0f} img/s"
        + (
            " (loader.num_workers 0: the trial's own process, between its steps)"
            if workers == 0
            else f" (only {workers} loader workers on {cpu:g} CPUs)"
            if workers < cpu
            else ""
        )
    )
    against = f" against the {need:,.0f} img/s a trial consumes ({source})" if need else ""
    if switch:
        verdict = "" if need is None else (": that would keep up" if capacity >= need else ": that would be data-bound")
        return [
            f"input capacity per trial: on the GPU (data.{switch}: true; the cores only read and collate); "
            f"on the CPU it would be {cpu_figure}{against}{verdict}"
        ]
    head = f"input capacity per trial: {cpu_figure}"
    if need is None:
        return [f"{head}; a CPU trial's step shares those cores (set images_per_s to compare)"]
    if capacity >= need:
        return [f"{head}{against}: the data keeps up"]
    return [
        f"{head}{against}: data-bound, the GPU would wait about {1 - capacity / need:.0%} of each step",
        f"  feed it faster: {knobs(profile)} (benchmarks/input_pipeline.py measures the rate per core)",
    ]
