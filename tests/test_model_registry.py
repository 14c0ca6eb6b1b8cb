"""The LPT MLflow model (tune/serving/model.py), its registration (tune/serving/registry.py) and batch
prediction (tune/predict.py). Fast tests log a tiny LPT to a real sqlite MLflow store; the slow
ones use the session's smoke search (run with ``--register``, conftest.py): a fresh process loads
the model by its ``models:/`` URI, the predict CLI reproduces the search's test accuracy, the
report CLI registers a finished search, and ``mlflow models serve`` answers docs/serving.md's curl."""

import base64
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from smoke_search import search_env
from tiny_profile import SYNTHETIC, tiny_profile

from lpt_core import LPT, build_backbone_from_spec, save_prompts
from lpt_core.data import build_dataset
from lpt_core.inference import build_classifier, png_bytes, raw_split
from lpt_core.trainer import evaluate
from tune import names
from tune import tracking as mt
from tune.config.study import ProfileConfig
from tune.serving import model as lpt_model
from tune.serving.check import ModelRefused, check_model_dir
from tune.serving.registry import MODEL_URI_TAG, NothingToRegister, register_best, register_finished_search
from tune.trial.table import TrialRow

ROOT = Path(__file__).resolve().parents[1]
PREDICT = ROOT / "tune" / "predict.py"
# as load_profile returns it: every default filled in by the profile model
PROFILE = ProfileConfig.from_dict(
    tiny_profile({**SYNTHETIC, "val_per_class": 4, "test_per_class": 4}, phase2={"epochs": 1, "scale": 20.0}, seed=3)
).to_dict()
CONFIG = {"pool_size": 6, "top_k": 3}  # the "trial's" sampled params
ENV = search_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")


@pytest.fixture(scope="module", autouse=True)
def no_pickles():
    """Every model here loads as the image loads it: MLflow refuses to unpickle anything."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        yield


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny trained-looking LPT (random prompts, the profile's seeded random backbone) registered
    through ``register_best`` in a fresh sqlite store, as the driver's wrap-up does."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    data = build_dataset(PROFILE["data"])
    torch.manual_seed(PROFILE["seed"])
    backbone = build_backbone_from_spec(PROFILE["backbone"])
    torch.manual_seed(1)
    model = LPT(backbone, data.num_classes, **{**PROFILE["model"], **CONFIG})
    with torch.no_grad():
        model.group_keys.normal_()  # distinct keys: the images pick different prompts
    prompt_file = folder / "prompts" / "trial0.safetensors"
    save_prompts(model, prompt_file)
    client = MlflowClient(uri)
    exp = mt.experiment_id(client, "prompt_pool", uri)
    parent = client.create_run(exp, tags={names.ROLE: "study"}).info.run_id
    trial = client.create_run(
        exp, tags={names.ROLE: "trial", names.PARENT: parent, names.TRIAL_ID: "trial0"}
    ).info.run_id
    client.set_terminated(trial)
    model.set_phase(2)
    test = {f"test_{k}": v for k, v in evaluate(model, data.test, data.class_counts).items() if k.endswith("acc")}
    best = TrialRow(
        trial_id="trial0", status="completed", mlflow_run_id=trial, val_acc=55.0, val_few_acc=40.0, params=CONFIG
    )
    model_uri = register_best(
        uri,
        "prompt_pool-tiny",
        study="prompt_pool",
        profile_name="tiny",
        profile=ProfileConfig.model_validate(PROFILE),
        data=data,
        best=best,
        config=CONFIG,
        prompt_file=prompt_file,
        test=test,
        parent_run_id=parent,
    )
    return dict(
        folder=folder,
        uri=uri,
        client=client,
        data=data,
        model=model,
        backbone=backbone,
        parent=parent,
        trial=trial,
        test=test,
        model_uri=model_uri,
        prompt_file=prompt_file,
    )


def test_logged_model_holds_prompts_config_and_example_not_the_backbone(registered, tmp_path):
    client, uri = registered["client"], registered["uri"]
    assert registered["model_uri"] == "models:/prompt_pool-tiny/1"
    version = client.get_model_version("prompt_pool-tiny", "1")
    tags = version.tags
    assert tags["lpt.trial_id"] == "trial0" and tags["lpt.parent_run_id"] == registered["parent"]
    assert tags["lpt.study"] == "prompt_pool" and tags["lpt.profile"] == "tiny"
    assert float(tags["val_acc"]) == 55.0 and float(tags["test_acc"]) == pytest.approx(registered["test"]["test_acc"])
    assert "trial0" in version.description
    # logged on a run of its own in the experiment lpt-models (the cluster's registrar alone writes it)
    model_run = client.get_run(version.run_id)
    assert client.get_experiment(model_run.info.experiment_id).name == "lpt-models"
    assert model_run.data.tags["lpt.trial_run_id"] == registered["trial"] and model_run.data.tags["lpt.role"] == "model"
    assert model_run.data.tags["lpt.trial_id"] == "trial0" and model_run.info.status == "FINISHED"
    assert client.get_run(registered["parent"]).data.tags[MODEL_URI_TAG] == registered["model_uri"]
    assert client.get_run(registered["trial"]).info.status == "FINISHED"

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path)))
    files = {str(p.relative_to(local)): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "data/lpt/prompts.safetensors",
        "data/lpt/lpt_model.json",
        "input_example.json",
        "serving_input_example.json",
        "requirements.txt",
    } <= set(files)
    # data only: no code file, nothing pickled; the MLmodel names the installed loader module
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pickle", ".cloudpickle"))], files
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "tune.serving.loader" and pyfunc["data"] == "data/lpt", pyfunc
    assert pyfunc.get("code") is None and "python_model" not in pyfunc and "model_code_path" not in pyfunc, pyfunc
    check_model_dir(local)  # the layout the loader accepts
    model_bytes = sum(files.values())
    backbone_bytes = sum(p.numel() * p.element_size() for p in registered["backbone"].state_dict().values())
    prompt_bytes = sum(t.numel() * t.element_size() for t in registered["model"].prompt_state_dict().values())
    # the prompts and a few KB of metadata; the backbone (1.8 MB even for this tiny ViT) is not in it
    assert files["data/lpt/prompts.safetensors"] < prompt_bytes + 4096
    assert model_bytes < prompt_bytes + 64 * 1024 and model_bytes < backbone_bytes / 10, (model_bytes, backbone_bytes)

    config = json.loads((local / "data" / "lpt" / "lpt_model.json").read_text())
    assert config["backbone"] == PROFILE["backbone"] and config["backbone_seed"] == PROFILE["seed"]
    assert config["model"] == {**PROFILE["model"], **CONFIG}
    assert config["class_names"] == registered["data"].class_names and config["image_size"] == 32
    assert (
        config["normalisation"]
        == {
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "eval_resize": "square",
        }
        and config["logit_scale"] == 20.0
    )
    meta = mlflow.models.get_model_info(registered["model_uri"])
    assert meta.signature.inputs.input_names() == ["image"]
    assert meta.signature.outputs.input_names() == ["class_index", "class_name", "probability"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    assert base64.b64decode(example["dataframe_split"]["data"][0][0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_input_form_gives_the_trained_models_answer(registered, tmp_path):
    """Bytes, paths, uint8 tensors (DataFrame), a uint8 batch and a normalised float batch (unwrapped)
    agree, and their top class is what the model in memory predicts on the test split's own transform."""
    data, model = registered["data"], registered["model"]
    mlflow.set_tracking_uri(registered["uri"])
    run_id = registered["client"].get_model_version("prompt_pool-tiny", "1").run_id
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    raw = raw_split(data.test)
    images = [raw[i][0] for i in range(len(data.test))]
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(png_bytes(img))
    with torch.no_grad():
        expected = model.eval()(torch.stack([data.test[i][0] for i in range(len(data.test))]))[0].argmax(1).tolist()
    assert len(set(expected)) > 1  # not a constant answer

    by_bytes = loaded.predict(pd.DataFrame({"image": [png_bytes(img) for img in images]}), params={"top_classes": 3})
    by_path = loaded.predict(pd.DataFrame({"image": paths}), params={"top_classes": 3})
    by_tensor = loaded.predict(pd.DataFrame({"image": images}), params={"top_classes": 3})
    classifier = loaded.unwrap_python_model().classifier
    by_batch = classifier.predict(torch.stack(images), k=3)
    by_float = classifier.predict(torch.stack([data.test[i][0] for i in range(len(data.test))]), k=3)
    for answer in (by_path, by_tensor, pd.DataFrame(by_batch), pd.DataFrame(by_float)):
        assert answer["class_index"].tolist() == by_bytes["class_index"].tolist()
        assert (
            answer["probability"].apply(lambda p: [round(x, 5) for x in p]).tolist()
            == by_bytes["probability"].apply(lambda p: [round(x, 5) for x in p]).tolist()
        )
    assert [row[0] for row in by_bytes["class_index"]] == expected
    for idx, labels, probs in by_bytes.itertuples(index=False):
        assert len(idx) == 3 and labels == [data.class_names[c] for c in idx]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(loaded.predict(pd.DataFrame({"image": paths[:1]}))["class_index"][0]) == 5  # the default


def test_bad_input_is_one_line(registered, tmp_path):
    mlflow.set_tracking_uri(registered["uri"])
    loaded = mlflow.pyfunc.load_model(registered["model_uri"])
    cases = {
        "not an image": (pd.DataFrame({"image": [b"\x89PNG but not really"]}), r"images\[0\]: unreadable image"),
        "missing file": (pd.DataFrame({"image": [str(tmp_path / "nope.jpg")]}), r"nope\.jpg: no such image file"),
    }
    for what, (frame, pattern) in cases.items():
        with pytest.raises(MlflowException) as err:
            loaded.predict(frame)
        assert re.search(pattern, one_line(err.value.message)), what
    classifier = loaded.unwrap_python_model().classifier
    with pytest.raises(ValueError, match=r"float batch must be normalised \[B, 3, 32, 32\].*\[2, 3, 64, 64\]") as err:
        classifier.predict(torch.zeros(2, 3, 64, 64))
    one_line(str(err.value))
    with pytest.raises(ValueError, match=r"images\[0\]: expected a uint8 image \[3, H, W\]"):
        classifier.predict([torch.zeros(1, 8, 8, dtype=torch.uint8)])


def test_missing_backbone_weights_fail_like_the_search(registered, tmp_path, monkeypatch, capsys):
    """A model whose backbone is pretrained but not on this machine: the search's one-line error."""
    mlflow.set_tracking_uri(registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path)))
    config_file = local / "data" / "lpt" / "lpt_model.json"
    config = json.loads(config_file.read_text())
    config["backbone"]["weights"] = "pretrained"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError) as search_error:
        build_backbone_from_spec(config["backbone"])
    with pytest.raises(MlflowException) as err:
        mlflow.pyfunc.load_model(str(local))
    assert one_line(err.value.message) == str(search_error.value)
    assert "backbone.weights: pretrained weights for vit_tiny_patch16_224" in str(search_error.value)
    from tune import predict as predict_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert predict_cli.main(["--model", str(local), "--split", "test", "--out", str(tmp_path / "p.csv")]) == 2
    assert f"error: --model {local}: {search_error.value}" in capsys.readouterr().err.splitlines()
    with pytest.raises(ValueError, match="backbone.weights: no such weights file"):
        build_classifier(config, registered["prompt_file"], weights=str(tmp_path / "missing.safetensors"))


class Pickled(mlflow.pyfunc.PythonModel):
    """A pyfunc model MLflow pickles: what anyone who may write a run could log in an LPT model's place."""

    def predict(self, context, model_input, params=None):
        return model_input


def test_a_pickled_model_is_refused_where_the_project_loads_models(registered, tmp_path, monkeypatch, capsys):
    """predict.py (and the driver's load-back check, lpt_model.load_model) never unpickle a model,
    even when the environment allows it: the layout check refuses it first, naming the MLmodel."""
    mlflow.set_tracking_uri(registered["uri"])
    with mlflow.start_run(experiment_id=registered["client"].get_experiment_by_name("prompt_pool").experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Pickled())
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    assert (local / "python_model.pkl").is_file()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    from tune import predict as predict_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    capsys.readouterr()  # what logging the model printed
    assert predict_cli.main(["--model", info.model_uri, "--split", "test", "--out", str(tmp_path / "p.csv")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: --model {info.model_uri}/MLmodel: a pickled python_model (python_model.pkl), never loaded here"
    ], errors
    assert lpt_model.load_model(registered["model_uri"]).unwrap_python_model().classifier is not None


MARKER = "lpt-tamper-ran"  # what the injected code would write if anything ran it
PAYLOAD = f"import pathlib, tempfile\npathlib.Path(tempfile.gettempdir(), {MARKER!r}).write_text('ran')\n"


def tamper(local: Path, how: str) -> str:
    """Change a downloaded LPT model as someone who may write its artifacts could; returns the
    model file the refusal must name."""
    mlmodel = local / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text())
    pyfunc = meta["flavors"]["python_function"]
    if how == "loader":  # the MLmodel's loader points at a module logged with the model
        pyfunc["loader_module"], pyfunc["code"] = "evil", "code"
        (local / "code").mkdir()
        (local / "code" / "evil.py").write_text(PAYLOAD + "def _load_pyfunc(*a):\n    return None\n")
        named = "MLmodel"
    elif how == "loader only":  # another installed module
        pyfunc["loader_module"] = "mlflow.sklearn"
        named = "MLmodel"
    elif how == "code path":  # the loader kept, a logged folder first on sys.path that shadows it
        pyfunc["code"] = "code"
        (local / "code" / "tune" / "serving").mkdir(parents=True)
        for folder in ("tune", "tune/serving"):
            (local / "code" / folder / "__init__.py").write_text("")
        (local / "code" / "tune" / "serving" / "loader.py").write_text(PAYLOAD)
        named = "MLmodel"
    elif how == "code file":  # the MLmodel untouched, a code file added next to the prompts
        (local / "data" / "lpt" / "lpt_model_code.py").write_text(PAYLOAD)
        return "data/lpt/lpt_model_code.py"
    elif how == "old layout":  # as the models-from-code version logged it
        del pyfunc["loader_module"], pyfunc["data"]
        pyfunc.update(model_code_path="lpt_model_code.py", artifacts={}, code=None)
        (local / "lpt_model_code.py").write_text(PAYLOAD)
        named = "MLmodel"
    mlmodel.write_text(yaml.safe_dump(meta))
    return named


TAMPERED = {
    "loader": r"loader_module 'evil' is not tune\.serving\.loader",
    "loader only": r"loader_module 'mlflow\.sklearn' is not tune\.serving\.loader",
    "code path": r"python_function code 'code': the LPT model has no code",
    "code file": r"a code file the LPT model does not have",
    "old layout": r"logged by an earlier version as a code file \(lpt_model_code\.py\), which is not run any more; "
    r"re-register it: python tune/report\.py --study STUDY --register NAME",
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_a_changed_loader_or_code_file_is_refused_naming_it(registered, tmp_path, monkeypatch, capsys, how):
    """Every load path refuses a tampered model in one line naming the file, before MLflow runs
    anything of it: lpt_model.load_model (predict.py, the --register load-back), predict.py's exit 2,
    the check CLI that docs/serving.md serves from; with the loader intact, MLflow's own load too."""
    marker = Path(tempfile.gettempdir(), MARKER)
    marker.unlink(missing_ok=True)
    mlflow.set_tracking_uri(registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path / "model")))
    named = tamper(local, how)
    with pytest.raises(ModelRefused) as err:
        lpt_model.load_model(str(local))
    line = one_line(str(err.value))
    assert line.startswith(f"{local}/{named}: ") and re.search(TAMPERED[how], line), line
    from tune import predict as predict_cli
    from tune.serving import check

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    capsys.readouterr()
    assert predict_cli.main(["--model", str(local), "--split", "test", "--out", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --model {line}"]
    assert check.main([str(local), str(tmp_path / "served")]) == 2
    assert one_line(capsys.readouterr().err) == f"error: {local}/{named}: {line.split(': ', 1)[1]}"
    if how == "code file":  # MLflow's own load_model (mlflow models serve): the installed loader refuses it
        with pytest.raises(MlflowException, match="a code file the LPT model does not have"):
            mlflow.pyfunc.load_model(str(local))
    assert not marker.exists() and "evil" not in sys.modules
    assert not (tmp_path / "p.csv").exists()


def test_a_model_changed_in_the_store_is_refused_by_its_registered_uri(registered, tmp_path, monkeypatch, capsys):
    """A code file written into a registered version's artifact location: predict.py refuses
    ``models:/NAME/VERSION`` with the line naming the file; the untouched version still loads."""
    mlflow.set_tracking_uri(registered["uri"])
    client = registered["client"]
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("prompt_pool").experiment_id):
        info = lpt_model.log_model(
            json.loads(
                Path(
                    mlflow.artifacts.download_artifacts(
                        f"{registered['model_uri']}/data/lpt/lpt_model.json", dst_path=str(tmp_path)
                    )
                ).read_text()
            ),
            registered["prompt_file"],
            lpt_model.input_example(registered["data"]),
        )
    version = mlflow.register_model(info.model_uri, "tampered-tiny").version
    store = Path(urllib.parse.urlparse(client.get_logged_model(info.model_id).artifact_location).path)
    (store / "data" / "lpt" / "lpt_model_code.py").write_text(PAYLOAD)
    from tune import predict as predict_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    capsys.readouterr()
    uri = f"models:/tampered-tiny/{version}"
    assert predict_cli.main(["--model", uri, "--split", "test", "--out", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --model {uri}/data/lpt/lpt_model_code.py: a code file the LPT model does not have"
    ]
    assert lpt_model.load_model(registered["model_uri"]).unwrap_python_model().classifier is not None


def run_predict(registered, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(PREDICT), *args],
        cwd=registered["folder"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_predict_cli_images_and_bad_input(registered, tmp_path):
    data = registered["data"]
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)  # searched recursively
    raw = raw_split(data.test)
    for i in range(3):
        (photos / ("sub" if i else "") / f"img{i}.png").write_bytes(png_bytes(raw[i][0]))
    out = tmp_path / "preds.csv"
    proc = run_predict(
        registered, "--model", registered["model_uri"], "--images", str(photos), "--out", str(out), "--top-classes", "2"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert list(rows[0]) == [
        "path",
        "class_index_1",
        "class_name_1",
        "probability_1",
        "class_index_2",
        "class_name_2",
        "probability_2",
    ]
    assert all(r["class_name_1"] == data.class_names[int(r["class_index_1"])] for r in rows)

    # bad input, as a user runs it: one line on stderr, exit 2
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    proc = run_predict(registered, "--model", registered["model_uri"], "--images", str(photos), "--out", str(out))
    assert proc.returncode == 2 and re.fullmatch(
        r"error: --images: \S+broken\.jpg: unreadable image \(.*\)", one_line(proc.stderr)
    ), proc.stderr
    assert not (photos.parent / "preds.csv.partial").exists() and len(out.read_text().splitlines()) == 4


def test_predict_cli_bad_input_names_it(registered, tmp_path, monkeypatch, capsys):
    from tune import predict as predict_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    empty = tmp_path / "empty"
    empty.mkdir()
    model = registered["model_uri"]
    bad = {
        ("--model", "models:/prompt_pool-tiny/7", "--images", str(empty)): "--model models:/prompt_pool-tiny/7: ",
        ("--model", "models:/no-such-model/1", "--images", str(empty)): "--model models:/no-such-model/1: ",
        ("--model", model, "--images", str(tmp_path / "nope")): f"--images {tmp_path / 'nope'}: no such folder",
        ("--model", model, "--images", str(empty)): f"--images {empty}: no image files",
        ("--model", model, "--split", "test", "--profile", "nope"): "nope",
        ("--model", model, "--split", "test", "--set", "seed=1"): "--set: only with --profile",
        ("--model", model, "--images", str(empty), "--top-classes", "0"): "--top-classes",
    }
    for args, needle in bad.items():
        assert predict_cli.main([*args, "--out", str(tmp_path / "bad.csv")]) == 2, args
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and needle in errors[0], (args, errors)
    assert not (tmp_path / "bad.csv").exists()


# ============================================================================ the smoke search
def smoke_model(smoke_search):
    assert smoke_search.returncode == 0, smoke_search.stderr[-3000:]
    found = re.search(r"^  model:\s+(models:/prompt_pool-smoke/\d+)$", smoke_search.stdout, re.M)
    assert found, smoke_search.stdout[-3000:]
    return found.group(1)


@pytest.mark.slow
def test_search_registers_its_best_trial(smoke_search):
    model_uri = smoke_model(smoke_search)
    assert model_uri == "models:/prompt_pool-smoke/1"
    client = smoke_search.client()
    parent = [
        r
        for r in client.search_runs(
            [client.get_experiment_by_name("prompt_pool").experiment_id], "tags.`lpt.role` = 'study'"
        )
    ][0]
    version = client.get_model_version("prompt_pool-smoke", "1")
    best_id = parent.data.tags["lpt.best_trial_id"]
    assert version.tags["lpt.trial_id"] == best_id and version.tags["lpt.parent_run_id"] == parent.info.run_id
    assert parent.data.tags[MODEL_URI_TAG] == model_uri
    trial = client.get_run(client.get_run(version.run_id).data.tags["lpt.trial_run_id"])
    assert trial.data.tags["lpt.trial_id"] == best_id and trial.data.tags["lpt.best"] == "true"
    for key in ("val_acc", "val_few_acc", "test_acc", "test_many_acc", "test_medium_acc", "test_few_acc"):
        assert float(version.tags[key]) == pytest.approx(trial.data.metrics[key], abs=1e-4), key
    # --register logged data, no code and no pickle: the MLmodel, the data folder, MLflow's metadata
    mlflow.set_tracking_uri(smoke_search.tracking_uri)
    files = [f.path for f in mlflow.artifacts.list_artifacts(model_uri)]
    assert "MLmodel" in files and "data" in files, files
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pickle"))], files


@pytest.mark.slow
def test_fresh_process_predicts_the_searchs_test_accuracy(smoke_search, tmp_path):
    model_uri = smoke_model(smoke_search)
    client = smoke_search.client()
    model_run = client.get_run(client.get_model_version("prompt_pool-smoke", "1").run_id)
    trial = client.get_run(model_run.data.tags["lpt.trial_run_id"])  # the model's run names its trial's
    out = tmp_path / "test-preds.csv"
    proc = subprocess.run(
        [sys.executable, str(PREDICT), "--model", model_uri, "--split", "test", "--out", str(out)],
        cwd=smoke_search.cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = trial.data.metrics
    line = (
        f"test: {m['test_acc']:.2f}% (many {m['test_many_acc']:.2f} / medium {m['test_medium_acc']:.2f} / "
        f"few {m['test_few_acc']:.2f})"
    )
    assert line in proc.stdout.splitlines(), proc.stdout
    assert f"recorded by the search: {line.removeprefix('test: ')}" in proc.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and rows[0]["path"] == "test/0"
    correct = sum(r["label"] == r["class_index_1"] for r in rows)
    assert 100.0 * correct / len(rows) == pytest.approx(m["test_acc"], abs=1e-9)

    # docs/serving.md's three lines, in a fresh process, by the models:/ URI
    readme = (ROOT / "docs" / "serving.md").read_text()
    snippet = re.search(
        r"```python\n(import pandas as pd\nfrom tune\.serving\.model import load_model.*?)```", readme, re.S
    ).group(1)
    photo = tmp_path / "photos" / "cat.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (48, 40), (200, 40, 40)).save(photo, format="JPEG")
    Image.new("RGB", (32, 32), (20, 40, 200)).save(tmp_path / "photos" / "dog.png")
    proc = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "MLFLOW_TRACKING_URI": smoke_search.tracking_uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class_index" in proc.stdout and re.search(r"\n0\s+\[\d+, \d+, \d+\]", proc.stdout), proc.stdout


@pytest.mark.slow
def test_report_registers_a_finished_search(smoke_search, tmp_path):
    smoke_model(smoke_search)
    copy = smoke_search.copy_to(tmp_path / "search")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune" / "report.py"), "--study", "prompt_pool", "--register"],
        cwd=copy.cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: models:/prompt_pool-smoke/2" in proc.stdout.splitlines()
    client = copy.client()
    first, second = (client.get_model_version("prompt_pool-smoke", v) for v in ("1", "2"))
    assert second.tags["lpt.trial_id"] == first.tags["lpt.trial_id"]
    assert second.tags["test_acc"] == first.tags["test_acc"]
    trial_run = lambda version: client.get_run(version.run_id).data.tags["lpt.trial_run_id"]  # noqa: E731
    assert trial_run(second) == trial_run(first)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune" / "report.py"), "--study", "prompt_pool", "--register", "bad/name"],
        cwd=copy.cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--register 'bad/name'" in one_line(proc.stderr)
    # tune/register.py (the compose service register): the same registration, no report rebuilt
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune" / "register.py"), "--study", "prompt_pool", "--name", "again"],
        cwd=copy.cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "model: models:/again/1" in proc.stdout.splitlines(), proc.stderr[-3000:]
    assert client.get_model_version("again", "1").tags["lpt.trial_id"] == first.tags["lpt.trial_id"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented_serve_and_curl() -> tuple[str, str, str]:
    readme = (ROOT / "docs" / "serving.md").read_text()
    block = re.search(
        r"```bash\n(python -m tune\.serving\.check .*?)\n"
        r"(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve .*?)\n(curl .*?)\n```",
        readme,
        re.S,
    )
    return block.group(1), block.group(2), block.group(3)


@pytest.mark.slow
def test_served_model_answers_the_documented_curl(smoke_search, tmp_path):
    model_uri = smoke_model(smoke_search)
    check, serve, curl = documented_serve_and_curl()
    port = free_port()
    assert "--env-manager local" in serve and "--port 5001" in serve and "5001/invocations" in curl
    assert "-m served-model " in serve and check.endswith("models:/prompt_pool-smoke/1 served-model")
    check = check.replace("models:/prompt_pool-smoke/1", model_uri).replace("python ", f"{sys.executable} ", 1)
    serve = serve.replace("5001", str(port))
    curl = curl.replace("5001", str(port))
    # the image docs/serving.md classifies: a test image of the smoke data, as a JPEG file
    data = build_dataset(json.loads((smoke_search.folder / "search.json").read_text())["profile"]["data"])
    image, _ = raw_split(data.test)[37]
    (tmp_path / "photos").mkdir()
    Image.open(io.BytesIO(png_bytes(image))).save(tmp_path / "photos" / "cat.jpg", quality=95)
    mlflow.set_tracking_uri(smoke_search.tracking_uri)
    expected = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"image": [str(tmp_path / "photos" / "cat.jpg")]})
    )

    env = {
        **ENV,
        "MLFLOW_TRACKING_URI": smoke_search.tracking_uri,  # `mlflow` of this interpreter's venv
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # the documented check downloads the registered model into served-model/ (tune from the checkout)
    checked = subprocess.run(
        ["bash", "-c", check], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert checked.returncode == 0 and (tmp_path / "served-model" / "MLmodel").is_file(), checked.stderr
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        ["bash", "-c", f"exec env {serve}"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the model server did not answer /ping in 180 s"
            time.sleep(1)
        proc = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        (tmp_path / "answer.json").write_text(proc.stdout)
        prediction = answer["predictions"][0]
        assert prediction["class_index"] == expected["class_index"][0]
        assert prediction["class_name"] == expected["class_name"][0]
        assert prediction["probability"] == pytest.approx(expected["probability"][0], abs=1e-6)
        # an unreadable image: a 400 with one line, not a traceback
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == 400
        body = err.value.read().decode()
        error = json.loads(body)
        # MLflow's server puts the input's repr before the model's one line; no traceback
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "Traceback" not in body
        assert re.fullmatch(
            r"Error: images\[0\]: unreadable image \(UnidentifiedImageError: .*\)", error["message"].splitlines()[-1]
        ), error
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def test_register_name_is_checked_before_anything_runs(capsys):
    from tune import search

    assert search.main(["--study", "prompt_pool", "--register", "bad/name", "--dry-run"]) == 2
    assert "--register 'bad/name': a registered model name is letters" in one_line(capsys.readouterr().err)
    assert search.parse_args(["--study", "s", "--register"]).register == ""  # the default name
    assert search.parse_args(["--study", "s"]).register is None


def test_search_register_on_the_compose_stack_names_the_register_service(monkeypatch, capsys):
    """The compose driver holds only searcher's login: --register is refused up front, in one line,
    with the command that registers (docker-compose.yml sets LPT_REGISTER_WITH); without it a
    search registers as before (the smoke search of conftest.py does)."""
    from tune import search

    monkeypatch.setenv("LPT_REGISTER_WITH", "docker compose run --rm register")
    assert search.main(["--study", "prompt_pool", "--register", "--dry-run"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "error: --register: this driver's MLflow login may not register models on this stack; "
        "after the search run: docker compose run --rm register --study prompt_pool"
    )
    assert search.main(["--study", "prompt_pool", "--dry-run"]) == 0  # a search without --register runs


def test_register_cli_bad_input_is_one_line(registered, tmp_path, monkeypatch, capsys):
    from tune import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert register.main(["--study", "prompt_pool", "--name", "bad/name"]) == 2
    assert "--name 'bad/name': a registered model name is letters" in one_line(capsys.readouterr().err)
    monkeypatch.setenv("LPT_MLFLOW_LOGIN", str(tmp_path / "missing"))
    assert register.main(["--study", "prompt_pool"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: LPT_MLFLOW_LOGIN={tmp_path / 'missing'}: not a readable MLflow credentials file (FileNotFoundError)"
    )
    monkeypatch.delenv("LPT_MLFLOW_LOGIN")
    assert register.main(["--study", "nope"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: --study nope: no MLflow experiment of that name")


def test_a_search_without_a_best_trial_has_nothing_to_register(registered, tmp_path):
    from tune.trial.table import write_table

    client = registered["client"]
    folder = tmp_path / "prompt_pool-tiny-1"
    folder.mkdir()
    (folder / "search.json").write_text(
        json.dumps(
            {
                "study": "prompt_pool",
                "profile_name": "tiny",
                "profile": PROFILE,
                "study_config": {"space": {"pool_size": {"type": "int", "low": 4, "high": 8}}},
            }
        )
    )
    write_table(
        [TrialRow(trial_id="t1", status="completed", params={"pool_size": 6}, mlflow_run_id=registered["trial"])],
        folder / "trials.parquet",
    )
    parent = client.get_run(
        client.create_run(
            client.get_experiment_by_name("prompt_pool").experiment_id, tags={names.ROLE: "study"}
        ).info.run_id
    )
    with pytest.raises(NothingToRegister, match=r"no best trial recorded \(tag lpt.best_trial_id\)"):
        register_finished_search(client, registered["uri"], parent, folder, None)
    client.set_tag(parent.info.run_id, "lpt.best_trial_id", "t9")
    with pytest.raises(NothingToRegister, match=r"trials.parquet: no row for the best trial t9"):
        register_finished_search(client, registered["uri"], client.get_run(parent.info.run_id), folder, None)
    assert not client.search_model_versions("name = 'prompt_pool-tiny'")[1:]  # still only version 1
