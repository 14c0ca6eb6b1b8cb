"""The sampler sized to the budget, the baseline trial, ASHA-stopped trials as PRUNED and the
search's persistent Optuna study: the project's searcher and scheduler on a real local Ray Tune
run with an instant stand-in trainable (no training), and the checks of the study file."""

import optuna
import pytest
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from lpt_core.config import PhaseConfig
from tune.config.loading import load_profile, load_study
from tune.config.samplers import describe_sampler, make_sampler, sampler_settings, startup_trials
from tune.config.search_space import baseline_config, check_baseline
from tune.config.space import Space
from tune.config.study import StudyConfig
from tune.engine.optuna_storage import open_storage, search_study, storage_url
from tune.engine.searcher import BASELINE, enqueue_baseline, make_scheduler, make_searcher
from tune.engine.tuner import pareto
from tune.engine.wrap_up import stale_confirmation
from tune.errors import ConfigError
from tune.names import OPTUNA_TRIAL_ID as TUNE_TRIAL_ID
from tune.search import main, parse_args

EPOCHS = 4
SMOKE_PHASE2 = PhaseConfig(epochs=EPOCHS, warmup="step")  # the smoke profile's: ASHA may judge at epoch 3
MARGIN = {"margin": {"type": "float", "low": 0.0, "high": 0.5}}  # a space that changes no rung


def study_of(values: dict) -> StudyConfig:
    return StudyConfig.model_validate({"space": MARGIN, **values})


def test_the_start_up_count_is_a_third_of_the_budget_between_2_and_10():
    assert [startup_trials(b) for b in (1, 6, 8, 12, 16, 30, 48, 200)] == [2, 2, 2, 4, 5, 10, 10, 10]
    _, study = load_study("prompt_pool")  # top_k 1..4 never exceeds the smallest pool_size, 4
    assert sampler_settings(study, 12) == {
        "type": "tpe",
        "seed": 0,
        "n_startup_trials": 4,
        "multivariate": True,
        "group": False,
        "constant_liar": True,
    }
    study.space.top_k.high = 8  # now top_k's range depends on each trial's pool_size
    settings = sampler_settings(study, 12)
    assert settings["group"] is True
    assert describe_sampler(settings, 12) == (
        "TPE (multivariate, group, constant liar), 4 random start-up trials of 12, seed 0"
    )
    _, lengths = load_study("prompt_length")
    assert sampler_settings(lengths, 8)["group"] is False and sampler_settings(lengths, 8)["n_startup_trials"] == 2
    sampler = make_sampler(settings, seed_offset=3)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 4


def test_a_restored_searcher_queues_again_the_trials_asked_for_after_its_snapshot(tmp_path, capsys):
    """--resume restores the searcher Tune saved last: a trial asked of Optuna after that (the
    driver was killed in between) is in no Tune run, so its RUNNING Optuna trial goes back to the
    queue, and the next trial asked for takes it with its sampled parameters; the trials the
    snapshot knows go on and are told as before. The study ends with one trial per Tune trial."""
    _, profile = load_profile("smoke")
    study = study_of({"budget": {"trials": 4, "concurrency": 2}})
    storage = open_storage(storage_url(tmp_path))
    search_study(storage, "resumed", ["max"])

    def searcher():
        settings = sampler_settings(study, 4)
        return make_searcher(
            study, profile.model, 4, EPOCHS, ["val_acc"], ["max"], settings, storage=storage, study_name="resumed"
        ).searcher

    first = searcher()
    assert first.suggest("t_known") is not None
    first.save(str(tmp_path / "searcher-state.pkl"))  # Tune's snapshot
    lost = first.suggest("t_lost")  # then the kill

    restored = searcher()
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert "Optuna: 1 trial(s) asked for after Tune's last snapshot queued again" in capsys.readouterr().out
    assert restored.suggest("t_new") == lost  # the lost trial's config, in the lost trial
    restored.on_trial_complete("t_known", {"val_acc": 70.0, "epoch": EPOCHS})
    restored.on_trial_complete("t_new", {"val_acc": 60.0, "epoch": EPOCHS})
    trials = optuna.load_study(study_name="resumed", storage=storage_url(tmp_path)).trials
    assert [(t.user_attrs[TUNE_TRIAL_ID], t.state, t.value) for t in trials] == [
        ("t_known", TrialState.COMPLETE, 70.0),
        ("t_new", TrialState.COMPLETE, 60.0),
    ]


def test_a_study_names_its_sampler():
    base = {"seed": 1}
    given = sampler_settings(study_of({**base, "sampler": {"type": "tpe", "n_startup_trials": 7, "group": False}}), 12)
    assert given["n_startup_trials"] == 7 and given["group"] is False
    assert sampler_settings(study_of({**base, "sampler": {"type": "random"}}), 12) == {"type": "random", "seed": 1}
    for kind, cls in (
        ("gp", optuna.samplers.GPSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("random", optuna.samplers.RandomSampler),
    ):
        assert isinstance(make_sampler(sampler_settings(study_of({**base, "sampler": {"type": kind}}), 12)), cls)


@pytest.mark.parametrize(
    "sampler, objective, message",
    [
        ({"type": "random", "n_startup_trials": 3}, None, "sampler.n_startup_trials: not for type random"),
        ({"type": "gp", "multivariate": True}, None, "sampler.multivariate: only for type tpe, not gp"),
        ({"type": "tpe", "multivariate": False, "group": True}, None, "sampler.group: needs multivariate: true"),
        (
            {"type": "cmaes"},
            {"metrics": ["val_acc", "val_few_acc"], "modes": ["max", "max"]},
            "sampler.type: cmaes optimises one objective",
        ),
        ({"type": "bayes"}, None, "sampler.type"),
        ({"type": "tpe", "n_startup_trials": -1}, None, "sampler.n_startup_trials"),
    ],
)
def test_a_bad_sampler_is_one_line_naming_the_key(tmp_path, capsys, sampler, objective, message):
    study = {
        "space": {"margin": {"type": "float", "low": 0.0, "high": 0.5}},
        "sampler": sampler,
        **({"objective": objective} if objective else {}),
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["--study", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err


def test_the_baseline_is_the_profiles_values_and_must_be_a_possible_trial(tmp_path, capsys):
    _, profile = load_profile("smoke")
    space = {"prompt_length": {"type": "choice", "values": [2, 10]}, "lr": {"type": "float", "low": 0.01, "high": 0.1}}
    config = baseline_config(Space.model_validate(space), profile.model, profile.phase2)
    assert config == {"prompt_length": profile.model.prompt_length, "lr": profile.phase2.lr}
    with pytest.raises(
        ConfigError,
        match=r"space.prompt_length.values: the baseline needs the profile's "
        r"prompt_length 5 among \[2, 10\]; add it, or set baseline.enabled: false",
    ):
        check_baseline(Space.model_validate(space), config, "s.yaml")
    space["prompt_length"]["values"].append(5)
    assert check_baseline(Space.model_validate(space), config, "s.yaml") == ["lr=0.5 lies outside 0.01..0.1"]

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"space": space}, sort_keys=False))
    assert main(["--study", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "baseline: the first trial runs the profile's values (prompt_length=5, lr=0.5), every epoch "
        "(exempt from early stopping); note: lr=0.5 lies outside 0.01..0.1"
    ) in out
    assert "sampler: TPE (multivariate, constant liar), 4 random start-up trials of 12, seed 0" in out
    path.write_text(yaml.safe_dump({"space": space, "baseline": {"enabled": False}}))
    assert main(["--study", str(path), "--dry-run"]) == 0
    assert "baseline: off (baseline.enabled: false)" in capsys.readouterr().out


def _trial(config: dict) -> Trial:
    return Trial("stand_in", config=config, stub=True)


def test_a_confirmation_of_an_earlier_best_is_named_as_such():
    """``--confirm``'s metrics stay on the parent run; after an extension found another best without
    ``--confirm``, one summary line says whose they are and how to confirm the new best."""
    args = parse_args(["--study", "prompt_pool", "--profile", "smoke", "--resume", "--trials", "8"])
    assert stale_confirmation({}, "t2", args) == []  # never confirmed
    assert stale_confirmation({"lpt.confirmed_trial": "t2"}, "t2", args) == []
    [line] = stale_confirmation({"lpt.confirmed_trial": "t1", "lpt.test_exposed": "t1,t0,t2"}, "t2", args)
    assert line == (
        "  confirmation: the parent run's confirm_* metrics are of trial t1, the best before this "
        "extension; the test split has seen 3 configs of this search (t1, t0, t2), and confirming t2 "
        "(python tune/search.py --study prompt_pool --profile smoke --resume --confirm 5) tests it and the "
        "baseline again: judge it by its interval, not against the other configs' test numbers"
    )


def test_asha_compares_with_the_baseline_but_never_stops_it():
    study = {
        "early_stopping": {"enabled": True, "grace_period": 3, "reduction_factor": 2},
        "baseline": {"enabled": True, "exempt_from_early_stopping": True},
    }
    decisions = {}
    for exempt in (True, False):
        study["baseline"]["exempt_from_early_stopping"] = exempt
        scheduler = make_scheduler(study_of(study), SMOKE_PHASE2, "val_acc", "max")
        assert isinstance(scheduler, ASHAScheduler)
        trials = [_trial({BASELINE: False}) for _ in range(4)] + [_trial({BASELINE: True})]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        for trial, value in zip(trials[:4], (90.0, 85.0, 80.0, 75.0)):
            scheduler.on_trial_result(None, trial, {"epoch": 3, "val_acc": value})
        decisions[exempt] = scheduler.on_trial_result(None, trials[4], {"epoch": 3, "val_acc": 10.0})
        other = _trial({BASELINE: False})
        scheduler.on_trial_add(None, other)
        assert scheduler.on_trial_result(None, other, {"epoch": 3, "val_acc": 10.0}) == TrialScheduler.STOP
    assert decisions == {True: TrialScheduler.CONTINUE, False: TrialScheduler.STOP}


def test_asha_stops_a_trial_only_on_enough_trials_and_by_one_se():
    """Ray's ASHA stops a trial below the rung's cutoff on one reading, even against one other
    trial; the search's stops it only when the rung holds 3 other trials' results and it trails
    their cutoff by at least one binomial SE of val_acc (±2.83 points at 80% on 200 images)."""
    study = {
        "early_stopping": {"enabled": True, "grace_period": 3, "reduction_factor": 2},
        "baseline": {"enabled": True, "exempt_from_early_stopping": True},
    }
    steady = make_scheduler(study_of(study), SMOKE_PHASE2, "val_acc", "max", val_images=200)
    plain = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=EPOCHS, grace_period=3)
    decisions = {}
    for name, scheduler in (("steady", steady), ("ray", plain)):
        got = []
        for value in (80.0, 40.0, 80.0, 78.0, 76.0):  # the rung's cutoff (median) is 80 from the third on
            trial = _trial({BASELINE: False})
            scheduler.on_trial_add(None, trial)
            got.append(scheduler.on_trial_result(None, trial, {"epoch": 3, "val_acc": value}))
        decisions[name] = got
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decisions["ray"] == [C, S, C, S, S]  # 40 stopped against one trial; 78 on 2 points
    assert decisions["steady"] == [C, C, C, C, S]  # 40: one other trial only; 78: within 1 SE; 76: beyond
    assert steady.margin(80.0) == pytest.approx(100 * (0.8 * 0.2 / 200) ** 0.5)


def stand_in(config: dict) -> None:
    """Instant: the profile's values are the worst config; values rise with the epochs."""
    for epoch in range(1, EPOCHS + 1):
        score = 60.0 - abs(config["pool_size"] - 24) - 4 * abs(config["top_k"] - 3) + 2 * epoch
        tune.report({"val_acc": score, "val_few_acc": 40.0 + config["pool_size"] - 3 * config["top_k"], "epoch": epoch})


@pytest.fixture(scope="module")
def local_ray():
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_study(tmp_path, metrics, modes, trials=8, concurrency=1):
    _, profile = load_profile("smoke")
    study = StudyConfig.model_validate(
        {
            "space": {
                "pool_size": {"type": "int", "low": 4, "high": 40, "step": 2},
                "top_k": {"type": "int", "low": 1, "high": 4},
            },
            "budget": {"trials": trials, "concurrency": concurrency, "max_failures": 0},
            # several objectives: no early stopping (StudyConfig refuses it), as in gcl_asymmetry.yaml
            "early_stopping": {"enabled": len(metrics) == 1, "grace_period": 3, "reduction_factor": 2},
            "seed": 3,
            "baseline": {"enabled": True, "exempt_from_early_stopping": True},
        }
    )
    record = {"optuna_storage": storage_url(tmp_path), "optuna_study": "stand-in"}
    storage = open_storage(record["optuna_storage"])
    assert enqueue_baseline(
        search_study(storage, "stand-in", modes), baseline_config(study.space, profile.model, profile.phase2)
    )
    searcher = make_searcher(
        study,
        profile.model,
        4,
        EPOCHS,
        metrics,
        modes,
        sampler_settings(study, trials),
        storage=storage,
        study_name="stand-in",
    )
    grid = tune.Tuner(
        stand_in,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=make_scheduler(study, SMOKE_PHASE2, metrics[0], modes[0]), num_samples=trials
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="stand-in", verbose=0),
    ).fit()
    return record, {r.metrics["trial_id"]: r for r in grid}


@pytest.mark.slow
def test_the_study_outlives_the_search_with_the_baseline_first_and_asha_stops_pruned(tmp_path, local_ray):
    record, results = run_study(tmp_path, ["val_acc"], ["max"])
    assert record["optuna_storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="stand-in", storage=record["optuna_storage"])
    trials = study.get_trials()
    assert len(trials) == 8 and {t.user_attrs[TUNE_TRIAL_ID] for t in trials} == set(results)
    first = trials[0]
    assert first.user_attrs.get(BASELINE) is True and first.params == {"pool_size": 8, "top_k": 2}
    assert [t for t in trials if t.user_attrs.get(BASELINE)] == [first]
    assert results[first.user_attrs[TUNE_TRIAL_ID]].config[BASELINE] is True
    assert first.state == TrialState.COMPLETE and results[first.user_attrs[TUNE_TRIAL_ID]].metrics["epoch"] == EPOCHS
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.state for t in trials]  # ASHA stopped some: in the study as PRUNED, not COMPLETE
    for t in trials:
        last = results[t.user_attrs[TUNE_TRIAL_ID]].metrics
        if t.state == TrialState.PRUNED:
            assert last["epoch"] < EPOCHS and t.value == last["val_acc"]
            assert t.intermediate_values[last["epoch"]] == last["val_acc"]
        else:
            assert t.state == TrialState.COMPLETE and last["epoch"] == EPOCHS and t.value == last["val_acc"]
            assert sorted(t.intermediate_values) == list(range(1, EPOCHS + 1))
    assert not enqueue_baseline(study, {"pool_size": 8, "top_k": 2})  # the study has its baseline
    assert "stand-in" in dashboard_studies(record["optuna_storage"])


def dashboard_studies(url: str) -> str:
    """What ``optuna-dashboard URL`` (docs/reports.md's command) lists at /api/studies."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen(
        [str(exe), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    return json.dumps(json.load(answer))
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (
                    proc.stderr.read() if proc.poll() is not None else "timeout"
                )
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_the_pareto_front_is_optunas_best_trials_over_every_trial(tmp_path, local_ray):
    """Several objectives: no trial is stopped early (a trial ASHA stopped on the first objective
    would be off the front only because that one started slower), so the front is the
    non-dominated set of all the trials, each at its last epoch."""
    record, results = run_study(tmp_path, ["val_acc", "val_few_acc"], ["max", "max"], trials=8)
    done = [r.metrics for r in results.values()]
    assert len(done) == 8 and all(m["epoch"] == EPOCHS for m in done)
    keys = ("val_acc", "val_few_acc")
    expected = sorted(
        a["trial_id"]
        for a in done
        if not any(all(b[k] >= a[k] for k in keys) and any(b[k] > a[k] for k in keys) for b in done)
    )
    assert expected and pareto(record["optuna_storage"], record["optuna_study"]) == expected
    study = optuna.load_study(study_name="stand-in", storage=record["optuna_storage"])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql+psycopg2://lpt:secret@db:5432/optuna", "the URL holds a password"),
        ("not a url", "not a database URL"),
    ],
)
def test_a_bad_optuna_storage_is_refused_before_anything_starts(monkeypatch, capsys, url, message):
    monkeypatch.setenv("LPT_OPTUNA_STORAGE", url)
    assert main(["--study", "prompt_pool", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: LPT_OPTUNA_STORAGE") and message in err, err
