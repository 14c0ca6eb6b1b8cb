"""What a search concludes (issue 20, the study engine's side): early stopping judges trials only
after the warm-up, objectives exist in the profile's split, validation and test never overlap, the
phase-1 cache key holds every input of phase 1, and the summary states the noise floor."""

import math

import pytest
import yaml
from ray.tune.schedulers import FIFOScheduler
from test_data_cifar import shuffled_labels, write_cifar10, write_cifar100
from test_data_files import write_list

from lpt_core.config import PhaseConfig
from tune.config.early_stopping import describe, grace_epochs
from tune.config.loading import load_study
from tune.config.space import Space
from tune.config.study import EarlyStopping, StudyConfig
from tune.config.validation import binomial_se
from tune.engine.baseline_gain import validation_gain
from tune.engine.searcher import make_scheduler
from tune.errors import ConfigError
from tune.search import main
from tune.trial.table import TrialRow

RELEASED = PhaseConfig()  # 90 epochs, 1 warm-up epoch stepped per epoch
SMOKE = PhaseConfig(epochs=4, warmup="step")  # the smoke profile's phase 2
ES = EarlyStopping(enabled=True, grace_period="auto", reduction_factor=2)
MARGIN = {"margin": {"type": "float", "low": 0.0, "high": 0.5}}  # a space that changes no rung


def with_es(**values) -> EarlyStopping:
    return ES.model_copy(update=values)


def study_of(early_stopping: EarlyStopping, space: dict | None = None) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "early_stopping": early_stopping.model_dump(),
            "baseline": {"exempt_from_early_stopping": True},
            "space": space or MARGIN,
        }
    )


@pytest.mark.parametrize(
    "phase2, given, grace",
    [
        (RELEASED, "auto", 9),
        (RELEASED, 0.1, 9),
        (RELEASED, 0.25, 23),
        (RELEASED, 3, 3),
        (RELEASED, 30, 30),
        (SMOKE, "auto", 3),  # 1 warm-up epoch (per step), then 2 at the peak
        (SMOKE, 0.75, 3),
        (PhaseConfig(epochs=20), "auto", 3),  # the suggested --set phase2.epochs=20: 2 epochs at the peak, not 1
        (PhaseConfig(epochs=90, warmup_epochs=5), "auto", 9),
        (PhaseConfig(epochs=40, warmup_epochs=5), "auto", 7),
    ],
)
def test_the_grace_period_resolves_against_the_profiles_phase_2(phase2, given, grace):
    assert grace_epochs(with_es(grace_period=given), phase2) == grace


@pytest.mark.parametrize(
    "phase2, given, message",
    [
        (
            RELEASED,
            1,
            r"early_stopping.grace_period: 1 is inside phase 2's warm-up .*per epoch.*use auto or at least 3",
        ),
        (
            PhaseConfig(epochs=90, warmup_epochs=5, warmup="step"),
            0.04,
            r"early_stopping.grace_period: 0.04 of 90 epochs = 4 is inside phase 2's warm-up \(5 warm-up epochs, "
            r"per step over epochs 1..5 from lr 1e-06\).*at least 7",
        ),
        (SMOKE, 5, r"early_stopping.grace_period: 5 is beyond phase 2's 4 epochs"),
        (RELEASED, 2, r"early_stopping.grace_period: 2 is fewer than 2 epochs after phase 2's warm-up .*at least 3"),
    ],
)
def test_a_grace_period_inside_the_warm_up_is_refused(phase2, given, message):
    with pytest.raises(ConfigError, match=r"^s.yaml: " + message):
        grace_epochs(with_es(grace_period=given), phase2, "s.yaml")


def test_auto_turns_asha_off_when_no_epoch_follows_the_warm_up():
    one = PhaseConfig(epochs=2, warmup_epochs=1)  # epoch 1 at 1e-6, epoch 2 the last: not 2 epochs at the peak
    assert grace_epochs(ES, one) is None
    assert (
        grace_epochs(ES, PhaseConfig(epochs=2, warmup_epochs=0)) == 2
        and make_scheduler_rungs(PhaseConfig(epochs=2, warmup_epochs=0)) == []
    )
    assert grace_epochs(ES, PhaseConfig(epochs=1, warmup_epochs=0)) is None
    assert isinstance(
        make_scheduler(
            study_of(with_es(enabled=False)),
            RELEASED,
            "val_acc",
            "max",
        ),
        FIFOScheduler,
    )


def make_scheduler_rungs(phase2: PhaseConfig) -> list:
    scheduler = make_scheduler(study_of(ES), phase2, "val_acc", "max")
    return sorted(m for m, _ in scheduler._brackets[0]._rungs if m < phase2.epochs)


def test_the_shipped_studies_judge_after_a_tenth_of_the_released_schedule():
    assert make_scheduler_rungs(RELEASED) == [9, 18, 36, 72]
    study = load_study("prompt_pool")[1]
    assert describe(study.early_stopping, RELEASED, "val_acc", 1, study.space, 1980) == (
        "early stopping: ASHA on val_acc at epochs 9, 18, 36, 72 of 90 (reduction 2, grace auto: the latest of "
        "a tenth of the schedule 9; 2 epochs at the peak lr after the warm-up (1 epoch) 3); a trial is stopped at "
        "a rung only when the rung holds at least 3 other trials' results and it trails their cutoff by at least "
        "1 SE of val_acc (±1.1 points at 50% on 1,980 images)"
    )
    assert describe(study.early_stopping, SMOKE, "val_acc", 1, study.space).startswith(
        "early stopping: ASHA on val_acc at epoch 3 of 4 (reduction 2, grace auto: "
    )
    # full searches lr: no rung before the cosine has halved it (epoch 45 of 90)
    full = load_study("full")[1]
    line = describe(full.early_stopping, RELEASED, "val_acc", 1, full.space, 1980)
    assert line.startswith("early stopping: ASHA on val_acc at epoch 45 of 90 (reduction 3, grace auto: ")
    assert "lr is searched, so not before the cosine halves it 45" in line and "warning" not in line
    given = describe(full.early_stopping.model_copy(update={"grace_period": 9}), RELEASED, "val_acc", 1, full.space)
    assert given.startswith("early stopping: ASHA on val_acc at epochs 9, 27, 81 of 90 (reduction 3, grace 9)")
    assert given.endswith(
        "; warning: lr is searched and the first rung (9) comes before the cosine halves the lr (epoch 45): ASHA "
        "may rank learning rates by how fast they climb (use grace_period: auto)"
    )


@pytest.mark.parametrize("warmup", ["epoch", "step"])
def test_a_searched_warm_up_up_to_20_gets_no_rung_inside_20(warmup):
    """The grace period comes from the longest warm-up the space can sample, not the profile's."""
    raw = {"warmup_epochs": {"type": "int", "low": 0, "high": 20}, "pool_size": {"type": "int", "low": 4, "high": 8}}
    space = Space.model_validate(raw)
    phase2 = PhaseConfig(epochs=90, warmup_epochs=1, warmup=warmup)
    scheduler = make_scheduler(study_of(ES, raw), phase2, "val_acc", "max")
    rungs = sorted(m for m, _ in scheduler._brackets[0]._rungs if m < phase2.epochs)
    assert rungs and min(rungs) >= 22, rungs  # 20 warm-up epochs, then 2 at the peak
    assert grace_epochs(ES, phase2, space=space) == 22
    assert grace_epochs(ES, phase2) == 9  # the profile's own warm-up alone would allow 9
    with pytest.raises(ConfigError, match=r"grace_period: 10 is inside phase 2's warm-up \(20 warm-up epochs \(the "):
        grace_epochs(with_es(grace_period=10), phase2, "s.yaml", space)
    choice = Space.model_validate({"warmup_epochs": {"type": "choice", "values": [1, 5, 20]}})
    assert grace_epochs(ES, phase2, space=choice) == 22
    # a warm-up as long as the schedule runs none (the trainer's rule): the longest that runs counts
    short = PhaseConfig(epochs=20, warmup_epochs=1, warmup=warmup)
    assert grace_epochs(ES, short, space=space) is None  # 19 warm-up epochs + 2 at the peak > 20
    assert describe(ES, short, "val_acc", 1, space).startswith("early stopping: off: phase 2's 20 epochs leave no")


def test_a_study_with_several_objectives_and_early_stopping_is_refused(tmp_path, capsys):
    raw = yaml.safe_load(load_study("gcl_asymmetry")[0].read_text())
    del raw["early_stopping"]  # the default: enabled
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: early_stopping.enabled: ASHA ranks trials on one objective")
    assert len(err.splitlines()) == 1 and "set enabled: false" in err


def test_an_objective_over_an_empty_shot_group_is_refused(tmp_path, capsys):
    """CIFAR-10-LT's head of 500 images per class at imbalance 10 has no class under 20 images:
    val_few_acc would be NaN for every trial."""
    root = write_cifar10(tmp_path / "cifar", shuffled_labels(10, 500), shuffled_labels(10, 20, 1))
    sets = ["--set", f"data.root={root}", "--set", "data.imbalance_ratio=10", "--set", "backbone.weights=random"]
    assert main(["--study", "gcl_asymmetry", "--profile", "cifar10_lt", *sets, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        "objective: val_few_acc is the accuracy of the few-shot classes (at most 19 training images, "
        "shot_split standard), but in cifar10_lt no class has that many (training images per class: 50..300)"
    ) in err  # class 0 lends the profile's val_from_train (200) of its 500 to validation
    assert main(["--study", "prompt_pool", "--profile", "cifar10_lt", *sets, "--dry-run"]) == 0


def test_the_dry_run_states_both_phases_early_stopping_and_validation(tmp_path, capsys):
    root = write_cifar100(tmp_path / "cifar", shuffled_labels(5, 100), shuffled_labels(5, 10, 1))
    assert (
        main(
            [
                "--study",
                "prompt_pool",
                "--profile",
                "cifar100_lt",
                "--set",
                f"data.root={root}",
                "--set",
                "data.imbalance_ratio=10",
                "--set",
                "data.val_from_train=0",
                "--set",
                "backbone.weights=random",
                "--dry-run",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        "phase 1: 90 epochs, dual sampling, A-GCL (gamma_pos 0, gamma_neg 4; IB branch gamma_pos 0.5, "
        "gamma_neg 8, weight 0.5 -> 0), lr 0.02, wd 0.01, batch 256 per branch, warm-up 1 epoch "
        "(per epoch, from 1e-06)"
    ) in lines
    assert (
        "phase 2: 90 epochs, dual sampling, A-GCL (gamma_pos 0, gamma_neg 4; IB branch gamma_pos 0.5, "
        "gamma_neg 8, weight 0.5 -> 0), match weight 0.5, lr 0.02, wd 0.01, batch 256 per branch, warm-up "
        "1 epoch (per epoch, from 1e-06)"
    ) in lines
    [es] = [line for line in lines if line.startswith("early stopping: ")]
    assert es.startswith("early stopping: ASHA on val_acc at epochs 9, 18, 36, 72 of 90 (reduction 2, grace auto: ")
    assert "holds at least 3 other trials' results and it trails their cutoff by at least 1 SE of val_acc" in es
    # 5 classes of 100 at imbalance 10: 100, 56, 31, 17, 10 train; class 0 keeps all 100, the others give 20
    [val] = [line for line in lines if line.startswith("validation: ")]
    assert val == (
        "validation: 80 images, 20 per class; no image of 1 class: 0 (c0) (its accuracy is not measured; "
        f"the test split has it); one standard error of val_acc: ±{binomial_se(90, 80):.1f} points at 90%, "
        f"±{binomial_se(50, 80):.1f} at 50%"
    ), val
    assert lines[lines.index(val) + 1].startswith("warning: one standard error of val_acc reaches ±5.6 points")


def test_validation_that_overlaps_test_is_refused(tmp_path, capsys):
    root = tmp_path / "places"
    root.mkdir()
    write_list(root, "train.txt", [(f"train/c{y}/{i}.jpg", y) for y, n in enumerate([8, 4]) for i in range(n)])
    write_list(root, "test.txt", [(f"val/c{y}/{i}.jpg", y) for y in range(2) for i in range(3)])
    profile = yaml.safe_load((load_study("prompt_pool")[0].parent / "profiles" / "smoke.yaml").read_text())
    profile["data"] = {
        "name": "places_lt",
        "root": str(root),
        "train_list": "train.txt",
        "val_list": "test.txt",
        "test_list": "test.txt",
        "image_size": 32,
    }
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(profile))
    assert main(["--study", "prompt_pool", "--profile", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {path}: data: places_lt's validation and test splits share 6 images, so the search "
        "would select on the test split; give it a validation split disjoint from test (a val_list that "
        "is not the test_list, or a hold-out from train)"
    )


def test_the_gain_states_its_noise_floor_and_that_it_is_not_confirmed():
    best = TrialRow(
        trial_id="b",
        status="completed",
        params={"pool_size": 24},
        val_acc=88.0,
        val_many_acc=95.0,
        val_medium_acc=86.0,
        val_few_acc=70.0,
    )
    base = best.model_copy(update={"trial_id": "a", "params": {"pool_size": 20}, "val_acc": 86.0, "val_few_acc": 66.0})
    metrics, lines = validation_gain(best, base, ["pool_size"], 180, 12, "python tune/search.py --resume --confirm 3")
    assert metrics["baseline_val_acc_se"] == pytest.approx(100 * math.sqrt(0.86 * 0.14 / 180))
    assert metrics["gain_val_acc"] == pytest.approx(2.0) and metrics["gain_val_few_acc"] == pytest.approx(4.0)
    assert lines[1] == "  validation: 86.00% ± 2.59 (1 SE, 180 images) (many 95.00 / medium 86.00 / few 66.00)"
    assert lines[3] == (
        "  not confirmed: measured on the 180 validation images the best of 12 trials (one seed each) "
        "was selected on, so it is biased upward; confirm it on test with fresh seeds: "
        "python tune/search.py --resume --confirm 3"
    )
    assert len(validation_gain(best, base, ["pool_size"], 180, 12, None)[1]) == 3  # --confirm: the test figures follow
    assert binomial_se(90.0, 180) == pytest.approx(2.236, abs=1e-3) and math.isnan(binomial_se(50.0, 0))
