"""Batch prediction with a logged LPT model: ``python tune/predict.py --model URI --images DIR --out preds.csv``.

``--model`` is an MLflow model URI of the LPT pyfunc flavour (``models:/NAME/VERSION``,
``runs:/RUN_ID/model``, ...), resolved against MLFLOW_TRACKING_URI or ./mlflow.db as for
``tune/search.py``. ``--images DIR`` classifies every image file under DIR; ``--split test``
classifies a split of the model's own dataset (or ``--profile``'s, with ``--set`` overrides) and
prints its accuracy overall and many / medium / few, as the search computed it. The CSV has one row
per image: its path (``split/index`` for in-memory images), its label with ``--split``, and the
index, name and probability of each of its ``--top-classes`` best classes. ``--released FILE``
(with ``--profile`` and ``--split``) evaluates the released LPT checkpoint (``lpt_core.released``)
on a split of the profile's data with the release's input pipeline and shot groups (few <= 20) and
prints overall / many / medium / few. Exit 0 done; 2 bad input (one line on stderr naming the
model, folder, file or key); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

if not __package__:  # run as a script from anywhere: the repository root instead of tune/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class BadInput(ValueError):
    """The one line the CLI prints for bad input."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/predict.py", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="models:/NAME/VERSION, runs:/RUN_ID/model or another MLflow model URI")
    which.add_argument("--released", metavar="FILE", help="the released LPT checkpoint (e.g. LPT_places.pth)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a folder of image files (searched recursively)")
    source.add_argument("--split", choices=("train", "val", "test"), help="a split of the dataset (see --profile)")
    p.add_argument(
        "--profile", help="with --split: a profile (name or .yaml) whose data to use (default: the model's own)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --profile value")
    p.add_argument("--out", help="the CSV file to write (required with --model)")
    p.add_argument("--top-classes", type=int, default=5, metavar="K", help="classes per image in the CSV (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers that read and preprocess images")
    p.add_argument("--weights", help="a local backbone weights file instead of the model's (pretrained) spec")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, ...")
    return p.parse_args(argv)


def load_classifier(uri: str, weights: str | None, device: str):
    """The LPT classifier of an MLflow model URI: downloaded, its layout checked (no code, no
    pickle, the installed loader), then built by this project's code."""
    from mlflow.exceptions import MlflowException

    from tune.errors import error_line
    from tune.serving.check import ModelRefused
    from tune.serving.model import load_model

    try:
        model = load_model(uri, model_config={"weights": weights or "", "device": device})
    except ModelRefused as exc:  # names the file: --model models:/NAME/1/MLmodel: ...
        raise BadInput(f"--model {exc}") from None
    except MlflowException as exc:
        raise BadInput(f"--model {uri}: {str(exc).strip().splitlines()[0]}") from None
    except OSError as exc:
        raise BadInput(f"--model {uri}: {error_line(exc)}") from None
    classifier = (
        getattr(model.unwrap_python_model(), "classifier", None) if hasattr(model, "unwrap_python_model") else None
    )
    if classifier is None:
        raise BadInput(f"--model {uri}: not an LPT model (its pyfunc flavour is not tune.serving.loader's)")
    return classifier


def image_files(folder: str) -> list[str]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInput(f"--images {folder}: no such folder")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def split_data(args, classifier):
    """The dataset of ``--split`` (the model's own data spec, or ``--profile``'s), the split and
    how its shot groups are counted."""
    from lpt_core.data import build_dataset
    from tune.config.loading import load_profile
    from tune.errors import ConfigError

    if args.profile:
        try:
            profile = load_profile(args.profile, args.set)[1]
        except ConfigError as exc:
            raise BadInput(str(exc)) from None
        spec, shot_split = profile.data.model_dump(), profile.shot_split
        where = f"--profile {args.profile}"
    else:
        if args.set:
            raise BadInput("--set: only with --profile")
        spec, where = classifier.config.get("data") or {}, f"--model {args.model} (its data spec)"
        shot_split = classifier.config["shot_split"]
        if not spec:
            raise BadInput(f"{where}: the model records no dataset; give --profile")
    try:
        data = build_dataset(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(f"{where}: {exc}") from None
    if data.class_names != classifier.class_names:
        raise BadInput(f"{where}: its {data.num_classes} classes are not the model's {len(classifier.class_names)}")
    return data, getattr(data, args.split), shot_split


class Images:
    """(model input, label) of image i, read by ``read(i)``; a bad file fails with its name."""

    def __init__(self, classifier, read, labels: list[int], ids: list[str], where: str):
        self.classifier, self.read, self.labels, self.ids, self.where = classifier, read, labels, ids, where

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.classifier.preprocess_one(self.read(i), self.where), self.labels[i]


def recorded_test(uri: str) -> dict:
    """The test accuracies the search recorded for this model: a registered version's tags, or the
    metrics of the trial's run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registered = re.fullmatch(r"models:/([^/]+)/(\d+)", uri)
    run = re.match(r"runs:/([^/]+)/", uri)
    try:
        if registered:
            values: dict = MlflowClient().get_model_version(*registered.groups()).tags
        elif run:  # a registered model's own run names its trial's run (lpt.trial_run_id)
            client = MlflowClient()
            logged = client.get_run(run.group(1)).data
            trial = logged.tags.get("lpt.trial_run_id")
            values = client.get_run(trial).data.metrics if trial else logged.metrics
        else:
            return {}
    except MlflowException:
        return {}
    return {k: float(v) for k, v in values.items() if k.startswith("test_")}


def predict(args) -> int:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from lpt_core.inference import image_id, raw_split
    from lpt_core.metrics import confusion_counts, shot_accuracy

    classifier = load_classifier(args.model, args.weights, args.device)
    data, shot_split = None, "standard"
    if args.images:
        files = image_files(args.images)
        images = Images(classifier, files.__getitem__, [-1] * len(files), files, "--images")
    else:
        data, split, shot_split = split_data(args, classifier)
        raw = raw_split(split)
        images = Images(
            classifier,
            lambda i: raw[i][0],
            list(split.labels),
            [image_id(split, i, args.split) for i in range(len(split))],
            f"--split {args.split}",
        )
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max(1, min(args.top_classes, len(classifier.class_names)))
    loader: DataLoader = DataLoader(images, batch_size=args.batch_size, num_workers=args.workers)  # type: ignore[arg-type]
    if out.is_dir():
        raise BadInput(f"--out {args.out}: a folder, not a CSV file")
    c = len(classifier.class_names)
    correct = torch.zeros(c, dtype=torch.long)
    total = torch.zeros(c, dtype=torch.long)
    header = (
        ["path"]
        + (["label"] if data is not None else [])
        + [f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class_index", "class_name", "probability")]
    )
    seen = 0
    partial = out.with_name(out.name + ".partial")  # the CSV appears only when every image is classified
    try:
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            progress = tqdm(loader, desc="predicting", unit="batch", file=sys.stderr, disable=None)
            for idx, prob, top1, labels in classifier.top_classes(progress, k):
                for row, p, label in zip(idx.tolist(), prob.tolist(), labels.tolist()):
                    cells = [images.ids[seen]] + ([label] if data is not None else [])
                    for ci, pi in zip(row, p):
                        cells += [ci, classifier.class_names[ci], f"{pi:.6f}"]
                    writer.writerow(cells)
                    seen += 1
                if data is not None:
                    ok, n = confusion_counts(top1.cpu(), labels.cpu(), c)
                    correct += ok
                    total += n
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    print(f"{seen} images classified by {args.model}: {out}")
    if data is not None:
        from tune.reports.lines import shot_line

        acc = {
            f"{args.split}_{key}": value
            for key, value in shot_accuracy(correct, total, data.shot_counts, shot_split).items()
        }
        print(f"{args.split}: {shot_line(acc, args.split + '_')}")
        recorded = recorded_test(args.model) if args.split == "test" else {}
        if "test_acc" in recorded:
            print(f"recorded by the search: {shot_line(recorded, 'test_')}")
    return 0


def evaluate_released(args) -> int:
    """``--released``: the checkpoint's accuracy on ``--split`` of ``--profile``'s data."""
    from tune.errors import ConfigError
    from tune.serving.released import released_accuracy

    if not args.profile or not args.split:
        raise BadInput("--released: give --profile (its data) and --split (the checkpoint holds no dataset)")
    try:
        for line in released_accuracy(args.released, args.profile, args.set, args.split, args):
            print(line, flush=True)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise BadInput(str(exc)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.released:
        try:
            return evaluate_released(args)
        except BadInput as exc:
            return fail(exc, EXIT_BAD_INPUT)
        except Exception as exc:  # an unreadable image names its file
            return fail(f"evaluation failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
    if not args.out:
        return fail("--out: required with --model", EXIT_BAD_INPUT)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from tune import errors
    from tune import tracking as mt
    from tune.errors import error_line

    try:
        mlflow.set_tracking_uri(mt.existing_store_uri())
    except mt.MissingStore as exc:
        if not Path(args.model).expanduser().is_dir():  # a model folder needs no store
            return fail(f"--model {args.model}: {exc}", EXIT_BAD_INPUT)
    except errors.ServiceError as exc:
        return fail(exc, EXIT_FAILED)
    try:
        if args.top_classes < 1 or args.batch_size < 1 or args.workers < 0:
            raise BadInput("--top-classes and --batch-size must be >= 1, --workers >= 0")
        return predict(args)
    except (BadInput, ValueError, FileNotFoundError) as exc:  # unreadable images name their file
        lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # from a DataLoader worker the message is a traceback: its last line holds the error
        return fail(f"{lines[-1] if 'Traceback' in str(exc) else lines[0]}", EXIT_BAD_INPUT)
    except Exception as exc:
        return fail(f"prediction failed: {error_line(exc)}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
