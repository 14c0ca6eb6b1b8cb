#!/usr/bin/env python
"""Search quality of the study's sampler: how far from a known optimum each sampler setting ends.

The project's own wiring runs unchanged (``tune.engine.searcher.make_searcher`` with the LPT space and the
baseline trial, ``make_scheduler``'s ASHA as the study configures it, the study's concurrency, one
real Ray Tune run per search) against an instant analytic stand-in for training, so nothing trains
and the optimum is known. For each study, budget, sampler setting and seed the regret is

    regret = optimum - true value of the trial the search would report,

the reported trial being the best observed final value among trials that ran all epochs (ASHA
stopped the others). Sampler settings, all with the same seeds:

- ``configured``: ``tune.config.samplers.sampler_settings(study, budget)`` (what a search runs);
- ``defaults``: a plain ``optuna.samplers.TPESampler(seed=...)``, what the code did before the study
  had a ``sampler`` section. Optuna 5's defaults: ``n_startup_trials=10``, constant liar, and
  multivariate TPE for one objective but independent TPE for several;
- ``random``: ``optuna.samplers.RandomSampler``;
- ``gp`` (not run by default): ``optuna.samplers.GPSampler`` with the configured start-up count.

Every search starts with the baseline trial (the profile's own values, exempt from ASHA), as a real
search does by default.

The stand-in objective. Each searched parameter x_i maps to u_i in [0, 1] over its range (index over
the list for a choice, log scale for a log range); c_i is the optimum's u (``OPTIMUM``, put on the
study's grid), d_i = u_i - c_i, w_i its weight (``WEIGHT``), and P the pairs (``COUPLED``) whose
offsets interact, so that sampling the parameters jointly can pay:

    Q(x)    = (sum_i w_i d_i^2 + sum_{(i,j) in P} (d_i - d_j)^2) / sum_i w_i
    val_acc = 80 - 50 Q(x)                       (the optimum: 80, at u = c)

A second objective (``val_few_acc``, gcl_asymmetry) is 65 - 50 Q(x) around ``FEW_OPTIMUM`` (more
asymmetric losses); a study with two objectives is scored by their mean, whose optimum is at the
midpoint of the two centres. Epoch e of E reports value * (1 - 0.4 (1 - e/E)^2) plus Gaussian
noise of standard deviation sigma (1 + (1 - e/E)) (``--noise`` sigma, default 0.3 points),
deterministic in the seed, the config and the epoch: values rise towards the final one, and the
early ones are noisier, so ASHA sometimes stops the wrong trial. The regret uses the noise-free
value of the reported trial, so it is never below 0.

    python benchmarks/search_quality.py                      # 3 studies x 12/24/48 trials x 5 seeds
    python benchmarks/search_quality.py --studies prompt_pool --budgets 12 --seeds 2 --out r.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune as raytune  # noqa: E402

from lpt_core.config import PhaseConfig  # noqa: E402
from tune.config.loading import load_profile, load_study, objective_of  # noqa: E402
from tune.config.samplers import sampler_settings, startup_trials  # noqa: E402
from tune.config.search_space import baseline_config, check_space  # noqa: E402
from tune.config.study import ProfileConfig, StudyConfig  # noqa: E402
from tune.engine.searcher import enqueue_baseline, make_scheduler, make_searcher  # noqa: E402
from tune.errors import ConfigError, error_line  # noqa: E402

DEPTH = 12  # blocks of the shipped profiles' ViT-B/16: group_start can take 1..11
PEAK = {"val_acc": 80.0, "val_few_acc": 65.0}
SCALE = 50.0
# The optimum, in each parameter's own units: away from the profiles' baseline and the ranges' middle.
OPTIMUM = {
    "prompt_length": 20,
    "pool_size": 30,
    "top_k": 3,
    "group_start": 4,
    "gamma_pos": 0.5,
    "gamma_neg": 5.0,
    "ib_gamma_pos": 1.0,
    "ib_gamma_neg": 4.0,
    "margin": 0.2,
    "lr": 0.05,
}
FEW_OPTIMUM = {**OPTIMUM, "gamma_neg": 7.0, "ib_gamma_neg": 9.0}  # the tail wants more asymmetry
WEIGHT = {
    "prompt_length": 1.0,
    "pool_size": 1.5,
    "top_k": 1.0,
    "group_start": 2.0,
    "gamma_pos": 0.5,
    "gamma_neg": 1.0,
    "ib_gamma_pos": 0.5,
    "ib_gamma_neg": 1.0,
    "margin": 0.5,
    "lr": 3.0,
}
COUPLED = [("pool_size", "top_k"), ("gamma_pos", "gamma_neg"), ("ib_gamma_pos", "ib_gamma_neg")]
SETTINGS = ("configured", "defaults", "random", "gp")
LABELS = {"configured": "tpe (as configured)", "defaults": "tpe (Optuna defaults)", "random": "random", "gp": "gp"}
DEFAULT_STUDIES = ("prompt_pool", "gcl_asymmetry", "full")


# ----------------------------------------------------------------------------- the stand-in
def unit(spec: dict, value) -> float:
    """``value``'s place in its range, 0..1 (log scale for a log range, list index for a choice)."""
    if spec["type"] == "choice":
        values = spec["values"]
        return values.index(value) / max(1, len(values) - 1)
    low, high = spec["low"], spec["high"]
    if spec.get("log"):
        return math.log(value / low) / math.log(high / low)
    return (value - low) / (high - low)


def on_grid(spec: dict, value):
    """The value of the study's space nearest to ``value``."""
    if spec["type"] == "choice":
        return min(spec["values"], key=lambda v: abs(v - value))
    value = min(max(value, spec["low"]), spec["high"])
    step = spec.get("step", 1 if spec["type"] == "int" else None)
    if step:
        value = spec["low"] + round((value - spec["low"]) / step) * step
    return int(value) if spec["type"] == "int" else float(value)


class StandIn:
    """The analytic objective over one study's space (picklable: Tune ships it to the trainable)."""

    def __init__(self, space: dict, metrics: list[str], epochs: int, noise: float, seed: int):
        if len(metrics) > 2 or metrics[0] != "val_acc" or metrics[1:] not in ([], ["val_few_acc"]):
            raise ValueError(f"objective {metrics}: the stand-in has val_acc and val_few_acc only")
        unknown = sorted(set(space) - set(OPTIMUM))
        if unknown:
            raise ValueError(f"space: no stand-in for {', '.join(unknown)}")
        self.space, self.metrics, self.epochs, self.noise, self.seed = space, metrics, epochs, noise, seed
        centres = {"val_acc": OPTIMUM, "val_few_acc": FEW_OPTIMUM}
        self.centre = {m: {n: unit(s, on_grid(s, centres[m][n])) for n, s in space.items()} for m in metrics}
        self.weight_sum = sum(WEIGHT[n] for n in space)

    def final(self, config: dict) -> dict:
        """Each objective's noise-free final value."""
        out = {}
        for m in self.metrics:
            d = {n: unit(s, config[n]) - self.centre[m][n] for n, s in self.space.items()}
            q = sum(WEIGHT[n] * v * v for n, v in d.items())
            q += sum((d[a] - d[b]) ** 2 for a, b in COUPLED if a in d and b in d)
            out[m] = PEAK[m] - SCALE * q / self.weight_sum
        return out

    def score(self, values: dict) -> float:
        """One number per trial: the objective, or the mean of two."""
        return sum(values[m] for m in self.metrics) / len(self.metrics)

    def optimum(self) -> float:
        """The best score over the space (for two objectives: at the midpoint of their centres)."""
        mid = {n: sum(self.centre[m][n] for m in self.metrics) / len(self.metrics) for n in self.space}
        at = {n: self._from_unit(s, mid[n]) for n, s in self.space.items()}
        return self.score(self.final(at))

    @staticmethod
    def _from_unit(spec: dict, u: float):
        if spec["type"] == "choice":
            return spec["values"][round(u * (len(spec["values"]) - 1))]
        low, high = spec["low"], spec["high"]
        return low * (high / low) ** u if spec.get("log") else low + u * (high - low)

    def observed(self, config: dict, epoch: int) -> dict:
        """What epoch ``epoch`` reports: rising towards the final value, noisier early."""
        key = zlib.crc32(repr(sorted((n, config[n]) for n in self.space)).encode())
        rng = np.random.default_rng([self.seed, epoch, key])
        left = 1 - epoch / self.epochs
        sigma = self.noise * (1 + left)
        return {m: v * (1 - 0.4 * left**2) + sigma * rng.standard_normal() for m, v in self.final(config).items()}

    def train(self, config: dict) -> None:
        """The trial: one report per epoch, instantly."""
        for epoch in range(1, self.epochs + 1):
            raytune.report({**self.observed(config, epoch), "epoch": epoch})


# ----------------------------------------------------------------------------- one search
def settings_for(name: str, study: StudyConfig, budget: int, seed: int) -> dict:
    if name == "configured":
        return sampler_settings(study, budget)
    if name == "defaults":
        return {"type": "tpe", "seed": seed}  # make_sampler: TPESampler(seed=seed), nothing else
    if name == "gp":
        return {"type": "gp", "seed": seed, "n_startup_trials": startup_trials(budget)}
    return {"type": "random", "seed": seed}


def run_search(
    study: dict,
    profile: ProfileConfig,
    setting: str,
    budget: int,
    seed: int,
    epochs: int,
    noise: float,
    storage_path: str,
) -> dict:
    """One real Ray Tune search of ``budget`` trials (``study``: the study file's dict and its
    ``name``); its regret and what it ran."""
    study = {**study, "seed": seed}
    study_cfg = StudyConfig.model_validate({k: v for k, v in study.items() if k != "name"})
    metrics, modes = objective_of(study_cfg.objective)
    standin = StandIn(study["space"], metrics, epochs, noise, seed)
    storage = optuna.storages.InMemoryStorage()
    name = f"{study['name']}-{setting}-{budget}-{seed}"
    ot_study = optuna.create_study(
        storage=storage, study_name=name, directions=["maximize" if m == "max" else "minimize" for m in modes]
    )
    if study_cfg.baseline.enabled:
        enqueue_baseline(ot_study, baseline_config(study_cfg.space, profile.model, profile.phase2))
    settings = settings_for(setting, study_cfg, budget, seed)
    searcher = make_searcher(
        study_cfg, profile.model, DEPTH, epochs, metrics, modes, settings, storage=storage, study_name=name
    )
    scheduler = make_scheduler(
        study_cfg, PhaseConfig(epochs=epochs, warmup_epochs=0), metrics[0], modes[0]
    )  # no warm-up

    def trainable(config: dict) -> None:
        standin.train(config)

    started = time.perf_counter()
    grid = raytune.Tuner(
        trainable,
        tune_config=raytune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=budget, reuse_actors=True),
        run_config=raytune.RunConfig(name=name, storage_path=storage_path, verbose=0),
    ).fit()
    seconds = time.perf_counter() - started
    finished = [r for r in grid if r.error is None and r.metrics and r.metrics.get("epoch") == epochs]
    best = max(finished, key=lambda r: standin.score(r.metrics), default=None)
    optimum = standin.optimum()
    # max: a trial at the optimum of a discrete space can come out 1e-15 above it
    regret = max(0.0, optimum - standin.score(standin.final(best.config))) if best else math.nan
    return {
        "study": study["name"],
        "budget": budget,
        "setting": setting,
        "seed": seed,
        "regret": regret,
        "optimum": optimum,
        "trials": len(grid),
        "finished": len(finished),
        "best_config": {n: best.config[n] for n in study["space"]} if best else None,
        "sampler": settings,
        "seconds": round(seconds, 2),
    }


# ----------------------------------------------------------------------------- summary
def summarise(rows: list[dict], within: float) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["study"], r["budget"], r["setting"]), []).append(r)
    studies = list(dict.fromkeys(r["study"] for r in rows))
    out = []
    for (study, budget, setting), rs in sorted(
        groups.items(), key=lambda g: (studies.index(g[0][0]), g[0][1], SETTINGS.index(g[0][2]))
    ):
        regrets = [r["regret"] for r in rs if not math.isnan(r["regret"])]
        limit = within / 100 * rs[0]["optimum"]
        out.append(
            {
                "study": study,
                "budget": budget,
                "setting": setting,
                "seeds": len(rs),
                "mean": statistics.fmean(regrets) if regrets else math.nan,
                "std": statistics.stdev(regrets) if len(regrets) > 1 else 0.0,
                "median": statistics.median(regrets) if regrets else math.nan,
                "within": sum(r <= limit for r in regrets) / len(rs),
                "no_result": len(rs) - len(regrets),
            }
        )
    return out


def table(summary: list[dict], within: float) -> str:
    lines = [
        f"| study | budget | sampler | mean regret ± std | median | within {within:g}% of optimum |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        miss = f" ({s['no_result']} without a result)" if s["no_result"] else ""
        lines.append(
            f"| {s['study']} | {s['budget']} | {LABELS[s['setting']]} | {s['mean']:.2f} ± "
            f"{s['std']:.2f} | {s['median']:.2f} | {s['within'] * s['seeds']:.0f}/{s['seeds']}{miss} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", nargs="+", default=list(DEFAULT_STUDIES), help="study names or files")
    p.add_argument("--budgets", nargs="+", type=int, default=[12, 24, 48], help="trials per search")
    p.add_argument("--seeds", type=int, default=5, help="searches per study, budget and setting (seeds 0..N-1)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=["configured", "defaults", "random"])
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--concurrency", type=int, help="trials at a time (default: the study's)")
    p.add_argument("--profile", default="cifar100_lt", help="profile whose model and phase-2 values are the baseline")
    p.add_argument("--noise", type=float, default=0.3, help="noise of the reported values, in points")
    p.add_argument("--within", type=float, default=1.0, help="a seed counts as close: regret <= this %% of the optimum")
    p.add_argument("--out", help="raw results: JSON, or CSV for a .csv name (written after every row)")
    p.add_argument("--summarise", nargs="+", metavar="JSON", help="run nothing: print the table of these --out files")
    args = p.parse_args(argv)
    for name, value in (
        ("--budgets", min(args.budgets)),
        ("--seeds", args.seeds),
        ("--epochs", args.epochs),
        ("--concurrency", args.concurrency or 1),
    ):
        if value < 1:
            p.error(f"{name} must be at least 1")
    return args


def quiet() -> None:
    for name in ("ray", "ray.tune", "ray.air", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def write(path: str, result: dict) -> None:
    out = Path(path)
    if out.suffix != ".csv":
        out.write_text(json.dumps(result, indent=1))
        return
    rows = result["runs"]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {**r, "best_config": json.dumps(r["best_config"]), "sampler": json.dumps(r["sampler"])} for r in rows
        )


def report(rows: list[dict], within: float, wall: str, where: str, epochs, noise) -> None:
    print(table(summarise(rows, within), within))
    print(
        f"\n{len(rows)} searches, {sum(r['trials'] for r in rows)} trials, {epochs} epochs each, "
        f"noise {noise}; {wall} on {where}"
    )


def read_result(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {error_line(exc)}") from None
    if not isinstance(result, dict) or not {"runs", "config", "seconds", "machine"} <= set(result):
        raise ConfigError(f"{path}: not a JSON file of search_quality.py --out")
    return result


def reprint(paths: list[str], within: float) -> dict:
    """The table of earlier runs' JSON files together (a run split over several processes)."""
    results = [read_result(p) for p in paths]
    rows = [r for res in results for r in res["runs"]]
    configs = {(res["config"]["epochs"], res["config"]["noise"]) for res in results}
    wall = f"{sum(res['seconds'] for res in results):.0f} s wall summed over {len(results)} runs"
    report(rows, within, wall, results[0]["machine"], *(list(configs)[0] if len(configs) == 1 else ("mixed", "mixed")))
    return {"summary": summarise(rows, within), "runs": rows}


def load_studies(args: argparse.Namespace, profile: ProfileConfig) -> list[dict]:
    """The studies to run, checked before Ray starts (a space the stand-in cannot score fails here),
    as their files' dicts with their ``name``."""
    studies = []
    for name in args.studies:
        path, config = load_study(name)
        if args.concurrency:
            config.budget.concurrency = args.concurrency
        check_space(config.space, profile.model, DEPTH, str(path))
        study = {**config.to_dict(), "name": path.stem}
        try:
            StandIn(study["space"], objective_of(config.objective)[0], args.epochs, args.noise, 0)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        studies.append(study)
    return studies


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        if args.summarise:
            return reprint(args.summarise, args.within)
        _, profile = load_profile(args.profile)
        studies = load_studies(args, profile)
    except ConfigError as exc:
        raise SystemExit(f"search_quality.py: {exc}") from None
    quiet()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no per-trial result files
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # then verbose=0 prints nothing
    if __name__ != "__main__":  # imported (a test): Ray's workers cannot import this file by name
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    where = machine()
    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=max(s["budget"]["concurrency"] for s in studies),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    rows: list[dict] = []
    result = {
        "config": vars(args),
        "machine": where,
        "seconds": None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": {"ray": ray.__version__, "optuna": optuna.__version__},
        "runs": rows,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="search_quality-") as tmp:
            for budget in args.budgets:  # small budgets first: a run cut short still has whole rows
                for study in studies:
                    for setting in args.settings:
                        for seed in range(args.seeds):
                            rows.append(run_search(study, profile, setting, budget, seed, args.epochs, args.noise, tmp))
                        done = [r["regret"] for r in rows[-args.seeds :]]
                        print(
                            f"{study['name']} {budget} {LABELS[setting]}: regret {', '.join(f'{r:.2f}' for r in done)}",
                            file=sys.stderr,
                            flush=True,
                        )
                        if args.out:  # after every row of the table, so that a cut-short run keeps them
                            write(args.out, {**result, "seconds": round(time.perf_counter() - started, 1)})
    finally:
        ray.shutdown()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary"] = summarise(rows, args.within)
    report(rows, args.within, f"{result['seconds']:.0f} s wall", where, args.epochs, args.noise)
    if args.out:
        write(args.out, result)
    return result


if __name__ == "__main__":
    main()
