"""The CLI's checks before Ray starts: bad input exits 2 with one line naming the key; an
unreachable service exits 1 naming the address; --dry-run describes the search and trains nothing."""

import subprocess

import pytest
import yaml
from cluster_fixtures import free_port
from smoke_search import search_argv

from tune.search import main

GOOD_STUDY = {
    "objective": {"metric": "val_acc", "mode": "max"},
    "budget": {"trials": 2, "concurrency": 1},
    "space": {"pool_size": {"type": "int", "low": 4, "high": 8}},
}


def write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def run_main(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def study_with(**changes):
    study = yaml.safe_load(yaml.safe_dump(GOOD_STUDY))
    for dotted, value in changes.items():
        node = study
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return study


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(budget__trails=3), "budget.trails: unknown key"),
        (dict(budget__trials="many"), "budget.trials: must be an integer"),
        (dict(space={}), "space: empty"),
        (dict(space={"top_k": {"type": "int", "low": 0, "high": 3}}), "space.top_k.low: must be >= 1"),
        (
            dict(space={"pool_sise": {"type": "int", "low": 2, "high": 3}}),
            "space.pool_sise: not a searchable parameter",
        ),
        (
            dict(space={"margin": {"type": "int", "low": 0, "high": 1}}),
            "space.margin.type: unknown type 'int' (known: float, choice)",
        ),
        (
            dict(space={"epochs": {"type": "int", "low": 2, "high": 9}}),
            "space.epochs: not searchable: it sets the epoch count that early stopping (ASHA) compares trials at",
        ),
        (
            dict(space={"top_k": {"type": "choice", "values": [1, 2.5]}}),
            "space.top_k.values[1]: must be an integer, got 2.5",
        ),
        (dict(space={"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}), "space.lr.low: must be > 0"),
        (
            dict(budget__trails=3),
            "budget.trails: unknown key (known: trials, concurrency, max_failures, gpu_hours, cpu_hours, on_exhausted)",
        ),
        (
            dict(objective={"metrics": ["val_acc", "val_few_acc"], "modes": ["max"]}),
            "objective.modes: must give one mode per metric",
        ),
        (dict(space={"pool_size": {"type": "int", "low": 9, "high": 3}}), "space.pool_size.low: must be <= high"),
        (dict(space={"group_start": {"type": "int", "low": 5, "high": 9}}), "space.group_start: no value in 1..3"),
        (dict(objective={"metric": "test_acc"}), "objective.metric: must be one of"),
    ],
)
def test_bad_study_exits_2_naming_the_key(tmp_path, capsys, changes, needle):
    study = write(tmp_path, "study", study_with(**changes))
    code, err = run_main(capsys, "--study", study, "--dry-run")
    assert code == 2
    assert needle in err and study in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("phase2.epochs=0", "phase2.epochs: must be >= 1"),
        ("phase2.gama=1", "phase2.gama: unknown key"),
        ("resources.gpu=-1", "resources.gpu: must be >= 0"),
        ("resources.gpu=1.5", "resources.gpu: must be a fraction below 1 (trials share a GPU) or a whole number"),
        ("device=cuda", "resources.gpu: device cuda needs a GPU share per trial, got 0"),
        ("compile=maybe", "compile: must be true or false, got 'maybe'"),
        ("shot_split=paper", "shot_split: must be one of standard, released, got 'paper'"),
        ("images_per_s=0", "images_per_s: must be > 0"),
        ("model.top_k=20", "model.top_k: must be in 1..pool_size=8, got 20"),
        ("data.name=nope", "data.name: unknown dataset 'nope'"),
        ("backbone.name=not_a_model", "backbone.name: unknown timm model"),
        ("seed=abc", "seed: must be an integer"),
        (
            "data.max_per_clas=3",
            "data.max_per_clas: unknown key for dataset 'synthetic' (known: name, seed, image_size, num_classes",
        ),
        ("data.imbalance_ratio=0.5", "data.imbalance_ratio: must be >= 1, got 0.5"),
        ("input.interpolation=nearest", "input.interpolation: must be one of bilinear, bicubic, got 'nearest'"),
        ("model.head_dropout=1", "model.head_dropout: must be < 1, got 1"),
        ("phase2", "--set phase2: expected dotted.key=value"),
    ],
)
def test_bad_override_exits_2_naming_the_key(tmp_path, capsys, override, needle):
    code, err = run_main(capsys, "--study", write(tmp_path, "s", GOOD_STUDY), "--set", override, "--dry-run")
    assert code == 2 and needle in err, err
    assert len(err.splitlines()) == 1


def test_missing_files_and_bad_yaml(tmp_path, capsys):
    code, err = run_main(capsys, "--study", "no_such_study", "--dry-run")
    assert code == 2 and "--study no_such_study: no such study" in err and "prompt_pool" in err
    code, err = run_main(capsys, "--study", write(tmp_path, "s", GOOD_STUDY), "--profile", "nope", "--dry-run")
    assert code == 2 and "--profile nope: no such profile" in err
    broken = write(tmp_path, "broken", "space: {pool_size: [unclosed\n")
    code, err = run_main(capsys, "--study", broken, "--dry-run")
    assert code == 2 and "not valid YAML" in err and broken in err


def test_dry_run_describes_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["--study", "prompt_pool", "--dry-run", "--trials", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "pool_size: int 4..40 step 2" in out and "budget: 5 trials" in out
    assert "phase-1 trainings: 1, up front before the trials (one per prompt_length in [5]" in out
    assert "resources per trial: 1 CPU, 0 GPU" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_dry_run_states_the_cost_of_a_trial_and_of_the_search(capsys):
    """smoke: 10 classes, 16 steps of 2x32 per epoch (the released loop's 486 // 32 + 1); phase 1 2
    epochs, phase 2 4; 200 val images."""
    assert main(["--study", "prompt_pool", "--dry-run", "--trials", "5"]) == 0
    out = capsys.readouterr().out
    assert "cost per trial: phase 2 trains 4 epochs x 16 steps x 2x32 = 4,096 images (+ 800 evaluated)" in out
    assert "cost per phase 1 (1, unless cached): 2 epochs x 16 steps x 2x32 = 2,048 images (+ 400 evaluated)" in out
    assert "at most 22,528 training images (5 whole trials" in out
    assert "CPU time: add --set images_per_s=N" in out  # smoke trials use no GPU: CPU-core-hours
    assert main(["--study", "prompt_pool", "--dry-run", "--trials", "5", "--set", "images_per_s=0.5"]) == 0
    assert (
        "CPU time at 0.5 img/s: 2.28 CPU-core-h per trial, 1.14 per phase 1, at most 12.5 CPU-core-h for the "
        "search" in capsys.readouterr().out
    )
    args = ["--study", "prompt_pool", "--dry-run", "--trials", "5", "--set", "images_per_s=0.5"]
    assert main([*args, "--set", "resources.cpu=2", "--set", "resources.gpu=0.5", "--gpu-hours", "9"]) == 0
    assert (
        "GPU time at 0.5 img/s: 1.14 GPU-h per trial, 0.57 per phase 1, at most 6.3 GPU-h for the search"
        in capsys.readouterr().out
    )  # a trial holding half a GPU spends half its wall time in GPU-hours


def test_dry_run_says_what_the_budget_pays_for(capsys):
    """smoke at 50 img/s: a trial (4,096 images) is 81.9 s = 0.0228 CPU-core-hours, phase 1 half of it;
    ASHA's rungs at epochs 1, 2 of 4 (reduction 2) leave 1 + 1/2 + 2/4 = 2 epochs: half a trial."""
    assert main(["--study", "prompt_pool", "--dry-run", "--cpu-hours", "0.5", "--set", "images_per_s=50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        "cost budget: 0.5 CPU-core-hours (budget.cpu_hours); no trial starts once they are committed, then "
        "running trials finish"
    ) in out
    assert (
        "cost budget at 50 img/s: phase 1 up front 0.0114 CPU-core-hours (unless cached), then 21 whole trials "
        "of 0.0228, about 24 with ASHA's stops at epoch 3 (if each keeps 1/2 of its trials: 0.0199 a trial; "
        "the baseline runs every epoch): budget.trials (12) ends the search first"
    ) in out
    assert (
        main(
            [
                "--study",
                "prompt_pool",
                "--dry-run",
                "--set",
                "budget.cpu_hours=0.05",
                "--set",
                "budget.on_exhausted=stop",
                "--set",
                "images_per_s=50",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "then running trials stop at their next epoch" in out
    assert (
        "then 1 whole trial of 0.0228, about 1 with ASHA's stops at epoch 3 (if each keeps 1/2 of its "
        "trials: 0.0199 a trial; the baseline runs every epoch): the budget ends the search before budget.trials "
        "(12)"
    ) in out
    assert main(["--study", "prompt_pool", "--dry-run", "--cpu-hours", "0.01", "--set", "images_per_s=50"]) == 0
    assert "it leaves 0, less than one whole trial (0.0228): no trial would start" in capsys.readouterr().out
    assert main(["--study", "prompt_pool", "--dry-run", "--cpu-hours", "1"]) == 0
    assert "cost budget in trials: add --set images_per_s=N" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "budget.gpu_hours=1"], "budget.gpu_hours: the profile's trials ask for no GPU (resources.gpu: 0)"),
        (
            ["--set", "budget.gpu_hours=1", "--set", "budget.cpu_hours=1", "--set", "resources.gpu=1"],
            "budget.cpu_hours: give gpu_hours or cpu_hours, not both",
        ),
        (["--cpu-hours", "-1"], "budget.cpu_hours: must be > 0, got -1.0"),
        (["--set", "budget.on_exhausted=later"], "budget.on_exhausted: must be one of finish, stop, got 'later'"),
        (["--set", "budget.trials=3"], "--set budget.trials=3: use --trials N"),
        (["--set", "budget.hours=3"], "budget.hours: unknown key"),
    ],
)
def test_bad_budgets_exit_2_naming_the_key(capsys, argv, needle):
    code, err = run_main(capsys, "--study", "prompt_pool", *argv, "--dry-run")
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_a_budget_flag_replaces_the_studys_other_measure(tmp_path, capsys):
    study = write(tmp_path, "s", study_with(budget__cpu_hours=2.0))
    assert main(["--study", study, "--dry-run", "--set", "resources.gpu=1", "--gpu-hours", "3"]) == 0
    assert "cost budget: 3 GPU-hours (budget.gpu_hours)" in capsys.readouterr().out


def test_dry_run_shows_the_input_pipeline_of_the_backbone(capsys):
    assert main(["--study", "prompt_pool", "--dry-run"]) == 0
    assert (
        "input: mean 0.5/0.5/0.5, std 0.5/0.5/0.5, bilinear, eval square resize, crop 0.875" in capsys.readouterr().out
    )
    assert main(["--study", "prompt_pool", "--dry-run", "--set", "backbone.name=vit_small_patch16_224.dino"]) == 0
    assert (
        "input: mean 0.485/0.456/0.406, std 0.229/0.224/0.225, bicubic, eval short-side resize, crop 0.9"
        in capsys.readouterr().out
    )


def test_dry_run_shows_trials_per_gpu_and_compile(capsys):
    assert main(["--study", "prompt_pool", "--dry-run", "--set", "resources.gpu=0.25", "--set", "compile=true"]) == 0
    assert "resources per trial: 1 CPU, 0.25 GPU (4 trials per GPU), compiled blocks" in capsys.readouterr().out


def test_a_trial_too_big_for_the_local_ray_exits_2_and_records_nothing(tmp_path, capsys, monkeypatch):
    """Checked once Ray is up (a real local Ray): Tune would otherwise leave the trials pending."""
    monkeypatch.chdir(tmp_path)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    code, err = run_main(capsys, "--study", write(tmp_path, "s", GOOD_STUDY), "--set", "resources.cpu=4096")
    assert code == 2, err
    last = err.splitlines()[-1]  # Ray's own start-up warnings come first
    assert last.startswith("error: resources: a trial asks for 4096 CPU and 0 GPU on one node; the Ray nodes have")
    assert "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_dry_run_counts_phase1_trainings_per_prompt_length(capsys):
    assert main(["--study", "prompt_length", "--dry-run"]) == 0
    assert (
        "phase-1 trainings: 4, up front before the trials (one per prompt_length in [2, 5, 10, 20]"
        in capsys.readouterr().out
    )


def test_a_prompt_length_range_wider_than_the_budget_is_refused(tmp_path, capsys):
    """Each length is a phase 1 trained up front: 2..20 would be 19 of them for 8 trials."""
    wide = {
        **GOOD_STUDY,
        "budget": {"trials": 8, "concurrency": 2},
        "space": {"prompt_length": {"type": "int", "low": 2, "high": 20}},
    }
    study = write(tmp_path, "wide", wide)
    code, err = run_main(capsys, "--study", study, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (
        f"error: {study}: space.prompt_length: an int range of 19 lengths (2..20) means 19 phase-1 "
        f"trainings up front for 8 trials; use a choice of lengths, e.g. "
        f"{{type: choice, values: [2, 8, 14, 20]}}"
    )
    # within the budget (--trials 19), or as a choice, it is fine
    assert main(["--study", study, "--dry-run", "--trials", "19"]) == 0
    assert "phase-1 trainings: 19, up front" in capsys.readouterr().out
    narrow = {**wide, "space": {"prompt_length": {"type": "int", "low": 2, "high": 20, "step": 6}}}
    assert main(["--study", write(tmp_path, "narrow", narrow), "--dry-run"]) == 0
    assert (
        "phase-1 trainings: 4, up front before the trials (one per prompt_length in [2, 8, 14, 20]"
        in capsys.readouterr().out
    )


def test_unreachable_services_exit_1_naming_the_address(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = write(tmp_path, "s", GOOD_STUDY)
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    code, err = run_main(capsys, "--study", study)
    assert code == 1 and f"MLFLOW_TRACKING_URI={url}: cannot reach the MLflow server" in err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, err = run_main(capsys, "--study", study)
    assert code == 1 and f"RAY_ADDRESS={address}: cannot reach the Ray cluster" in err
    assert not (tmp_path / "runs").exists()


def test_the_real_cli_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        search_argv("--study", "prompt_pool", "--set", "phase1.lr=-1", "--dry-run"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("phase1.lr: must be > 0, got -1")
    assert len(proc.stderr.strip().splitlines()) == 1
