"""The released LPT checkpoint evaluated on a profile's data (``tune/predict.py --released``): the
model as ``lpt_core.released`` imports it, the data at the checkpoint's image size with the
release's input pipeline, accuracy overall and by the released evaluation script's shot groups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def released_accuracy(checkpoint: str, profile_name: str, sets: list[str], split_name: str, opts) -> Iterator[str]:
    """Lines to print: what was loaded, then the split's accuracy. ``opts``: ``device``,
    ``workers``, ``batch_size``. Bad input raises ConfigError or ValueError with one line."""
    from lpt_core.data import build_dataset
    from lpt_core.released import load_released
    from lpt_core.trainer import evaluate, make_loader, resolve_device
    from tune.config.loading import load_profile
    from tune.config.validation import binomial_se

    profile = load_profile(profile_name, sets)[1]
    where = f"--released {checkpoint}"
    try:
        model, shapes = load_released(Path(checkpoint).expanduser())
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:  # the release's pipeline (build_dataset's default), at the size its position embedding holds
        data = build_dataset(profile.data.model_copy(update={"image_size": shapes.image_size}))
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"--profile {profile_name}: {exc}") from None
    if data.num_classes != shapes.num_classes:
        raise ValueError(
            f"{where}: {shapes.num_classes} classes, --profile {profile_name}'s data has {data.num_classes}"
        )
    device = resolve_device(opts.device)
    split = getattr(data, split_name)
    yield f"released checkpoint {checkpoint}: {shapes.describe()}; {len(split):,} {split_name} images on {device}, fp32"
    result = evaluate(
        model.to(device),
        split,
        data.shot_counts,
        device=device,
        loader=make_loader(split, device, opts.workers, batch_size=opts.batch_size),
        batch_transform=data.eval_batch_transform,
        shot_split="released",
        bf16=False,  # the release evaluates in fp32
    )
    se = binomial_se(result["acc"], len(split))
    yield (
        f"{split_name} (released shot groups: few <= 20): {result['acc']:.2f}% ± {se:.2f} (1 SE) (many "
        f"{result['many_acc']:.2f} / medium {result['medium_acc']:.2f} / few {result['few_acc']:.2f})"
    )
