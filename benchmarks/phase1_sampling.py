"""Phase 1 with dual sampling (the default, as the paper's author describes phase 1) against plain
instance sampling (one shuffled branch), on a profile's data and backbone: the validation curves
of both, epoch by epoch, from the same initial prompts and head. An ablation, not a default.

    .venv/bin/python benchmarks/phase1_sampling.py                      # smoke profile, 10 epochs, CPU
    .venv/bin/python benchmarks/phase1_sampling.py --profile cifar100_lt --set data.root=/data/cifar --epochs 90

Prints one row per epoch and sampling: the training images so far (instance sampling trains one
branch of ``batch_size`` images per step, dual two), the loss, and the validation accuracy overall
and by shot group, with the validation size and one binomial standard error of the last epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lpt_core import LPT, PhaseConfig, Trainer, build_backbone_from_spec  # noqa: E402
from tune.config.loading import load_profile, profile_data  # noqa: E402
from tune.config.study import ProfileConfig  # noqa: E402
from tune.config.validation import binomial_se  # noqa: E402
from tune.errors import ConfigError  # noqa: E402

SAMPLINGS = ("dual", "instance")


def phase1_curve(profile: ProfileConfig, data, sampling: str, epochs: int) -> list[dict]:
    """Phase 1 of the profile's model with ``sampling``; the metrics of every epoch."""
    recipe = PhaseConfig.from_dict(
        {**profile.phase1.model_dump(), "epochs": epochs, "sampling": sampling}, where="phase1"
    )
    seed = profile.seed
    torch.manual_seed(seed)
    backbone = build_backbone_from_spec(profile.backbone.spec())
    model = LPT(backbone, data.num_classes, init_seed=seed, **profile.model.model_dump())
    trainer = Trainer(
        model,
        data,
        1,
        recipe,
        seed=seed,
        device="cpu" if profile.device == "cpu" else None,
        num_workers=profile.loader.num_workers,
        shot_split=profile.shot_split,
        log=None,
    )
    branches = 2 if sampling == "dual" else 1
    return [
        {**m, "images": m["epoch"] * trainer.steps_per_epoch * branches * recipe.batch_size} for m in trainer.epochs()
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=10, help="phase-1 epochs of each run")
    args = p.parse_args(argv)
    try:
        _, profile = load_profile(args.profile, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = profile_data(profile)
    n_val = len(data.val)
    curves = {s: phase1_curve(profile, data, s, args.epochs) for s in SAMPLINGS}
    print(
        f"phase 1 on {args.profile} ({profile.data.name}, {data.num_classes} classes, "
        f"{len(data.train_labels)} train / {n_val} val images), {args.epochs} epochs, seed {profile.seed}"
    )
    print(f"{'epoch':>5} {'sampling':>8} {'images':>8} {'loss':>8} {'val_acc':>8} {'many':>6} {'medium':>6} {'few':>6}")
    for epoch in range(args.epochs):
        for s in SAMPLINGS:
            m = curves[s][epoch]
            print(
                f"{m['epoch']:>5} {s:>8} {m['images']:>8} {m['train_loss']:>8.4f} {m['val_acc']:>8.2f} "
                f"{m['val_many_acc']:>6.1f} {m['val_medium_acc']:>6.1f} {m['val_few_acc']:>6.1f}"
            )
    for s in SAMPLINGS:
        last = curves[s][-1]["val_acc"]
        print(f"{s}: last val_acc {last:.2f} ± {binomial_se(last, n_val):.2f} (1 SE, {n_val} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
