"""benchmarks/step_throughput.py runs end to end at the tiniest size and its FLOP counts are right;
benchmarks/search_quality.py runs its searches and its stand-in objective peaks where it says.

No timing assertions: speed is measured by the benchmark, not tested here.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str = "step_throughput"):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load()
PROMPTS = dict(prompt_length=10, pool_size=20, top_k=2, group_start=None)


def test_tiny_run_writes_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    result = bench.main(
        [
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--flops-size",
            "none",
            "--out",
            str(out),
        ]
    )
    assert torch.get_num_threads() == threads  # --threads is undone after the run
    data = json.loads(out.read_text())
    assert data["variants"] == result["variants"] == ["reference", "lean", "timm"]
    phases = {}
    for row in data["results"]:
        phases.setdefault(row["variant"], set()).add(row["phase"])
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and row["achieved_tflops"] > 0
        assert row["images_per_step"] == 4
    assert phases == {"reference": {"phase2", "phase1", "eval"}, "lean": {"phase2", "phase1", "eval"}, "timm": {"eval"}}
    cfg = data["config"]
    assert (cfg["size"], cfg["image_size"], cfg["depth"], cfg["group_start"]) == ("tiny", 32, 4, 2)
    assert (cfg["prompt_length"], cfg["pool_size"], cfg["top_k"], cfg["num_classes"]) == (10, 20, 2, 100)
    flops = data["flops"]["timed"]
    assert 0 < flops["phase2_ratio_lean_over_reference"] < 1
    assert 0 < flops["eval_ratio_lean_over_reference"] < 1
    gflop = flops["gflop_per_image"]
    assert gflop["timm"]["eval"] < gflop["lean"]["eval"] < gflop["reference"]["eval"]
    # prompts enter as keys and values only: less work in phase 1 too
    assert gflop["lean"]["phase1"] < gflop["reference"]["phase1"]
    assert "flops_size" not in data["flops"]
    feed = data["input"]
    assert feed["path"] == "cifar100_lt format, CPU transforms" and feed["batch"] == 4
    assert feed["images_per_s"] > 0 and feed["over_phase2_step"] > 0


def test_fake_tensor_flops_equal_a_real_count():
    """The shape-only count equals count_flops of a real Trainer.train_step / reference step."""
    from lpt_core import PhaseConfig, Trainer
    from lpt_core.data import build_dataset
    from lpt_core.flops import count_flops

    data = build_dataset(
        {
            "name": "synthetic",
            "num_classes": 100,
            "imbalance_ratio": 10,
            "max_per_class": 20,
            "image_size": 32,
            "seed": 0,
        }
    )
    size = bench.SIZES["tiny"]
    fake = bench.count_variant_flops(size, 32, PROMPTS, batch=2, phases=("phase2",))
    torch.manual_seed(0)
    model = bench.build_lpt(size, 32, **PROMPTS)
    cfg = PhaseConfig(batch_size=2)
    trainer = Trainer(model, data, 2, cfg, device="cpu", log=None)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    lean = count_flops(lambda: trainer.train_step(images, labels, 0.5)) / 4 / 1e9
    ref_step = bench.ReferenceStep(model, 2, cfg, trainer.losses, amp=False)
    ref = count_flops(lambda: ref_step(images, labels, 0.5)) / 4 / 1e9
    assert fake["lean"]["phase2"] == pytest.approx(lean, rel=1e-9)
    assert fake["reference"]["phase2"] == pytest.approx(ref, rel=1e-9)


def test_vit_b16_phase2_flop_ratio_counted_in_seconds():
    summary = bench.flops_summary("vit_b16", bench.SIZES["vit_b16"], 224, PROMPTS, phases=("phase2",))
    g = summary["gflop_per_image"]
    assert 71.5 < g["lean"]["phase2"] < 73 and 94 < g["reference"]["phase2"] < 96  # 72.3 / 95.2
    assert 0.75 < summary["phase2_ratio_lean_over_reference"] < 0.77
    assert summary["eval_ratio_lean_over_reference"] is None and g["timm"] == {}


def test_bad_flops_size_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--flops-size", "vit_huge"])
    assert exc.value.code == 2


@pytest.mark.slow  # a Ray session and six Tune runs: 1-2 minutes on 2 shared cores
def test_search_quality_tiny_run(tmp_path):
    """benchmarks/search_quality.py runs the real wiring (Ray Tune, Optuna, ASHA) on its stand-in:
    one row per sampler setting, a finite regret >= 0 for every search."""
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "search_quality.py"),
            "--studies",
            "prompt_pool",
            "--budgets",
            "6",
            "--seeds",
            "2",
            "--epochs",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(s["study"], s["budget"], s["setting"], s["seeds"]) for s in data["summary"]] == [
        ("prompt_pool", 6, setting, 2) for setting in ("configured", "defaults", "random")
    ]
    assert len(data["runs"]) == 6
    for run in data["runs"]:
        assert math.isfinite(run["regret"]) and run["regret"] >= 0
        assert run["trials"] == 6 and 1 <= run["finished"] <= 6  # the baseline always finishes
        assert set(run["best_config"]) == {"pool_size", "top_k", "group_start"}
    assert data["runs"][0]["sampler"]["n_startup_trials"] == 2  # a third of 6, at least 2
    assert "| prompt_pool | 6 | tpe (as configured) |" in proc.stdout
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search_quality.py"), "--summarise", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and again.stdout.split("\n\n")[0] == proc.stdout.split("\n\n")[0]


def test_search_quality_stand_in_has_its_optimum_inside_the_space():
    quality = _load("search_quality")
    from tune.config.loading import load_study, objective_of

    for name in ("prompt_pool", "full", "gcl_asymmetry"):
        study = load_study(name)[1]
        space = study.to_dict()["space"]  # the stand-in reads the study file's dicts
        standin = quality.StandIn(space, objective_of(study.objective)[0], 4, 0.0, 0)
        optimum = standin.optimum()
        rng = np.random.default_rng(0)
        for _ in range(200):  # no point of the space scores above the optimum
            config = {
                n: quality.on_grid(
                    s,
                    s["values"][rng.integers(len(s["values"]))]
                    if s["type"] == "choice"
                    else rng.uniform(s["low"], s["high"]),
                )
                for n, s in space.items()
            }
            assert standin.score(standin.final(config)) <= optimum + 1e-9
        at = {n: quality.on_grid(s, quality.OPTIMUM[n]) for n, s in space.items()}
        if len(standin.metrics) == 1:  # the optimum is reached at OPTIMUM, and reported values rise to it
            assert standin.score(standin.final(at)) == pytest.approx(optimum) == pytest.approx(80.0)
            values = [standin.observed(at, e)["val_acc"] for e in range(1, 5)]
            assert values == sorted(values) and values[-1] == pytest.approx(80.0)


def test_phase1_sampling_ablation_runs_both_samplings(capsys):
    """benchmarks/phase1_sampling.py: dual against instance sampling in phase 1 from the same start;
    instance sampling trains one branch in one pass (15 steps; dual runs the released loop's 16)."""
    ablation = _load("phase1_sampling")
    assert ablation.main(["--epochs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {(r.split()[0], r.split()[1]): r.split() for r in out if r.split()[:1] in (["1"], ["2"])}
    assert set(rows) == {(e, s) for e in ("1", "2") for s in ("dual", "instance")}
    assert int(rows["2", "dual"][2]) == 2 * 16 * 2 * 32  # 2 epochs x 16 steps of 2x32
    assert int(rows["2", "instance"][2]) == 2 * 15 * 32  # 2 epochs x 15 steps of 32
    assert any(line.startswith("dual: last val_acc ") and "(1 SE, 200 images)" in line for line in out)


def test_input_pipeline_decoder_table_has_every_decoder_and_size(tmp_path):
    out = tmp_path / "input.json"
    pipeline = _load("input_pipeline")
    assert pipeline.main(["--skip-loaders", "--decode-images", "2", "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["decoders"]
    cpu = {(r["images"], r["decoder"], r["what"]) for r in rows if r["device"] == "cpu, per core"}
    for size in pipeline.SIZES:
        for decoder in ("PIL", "torchvision.io", "TorchCodec"):
            assert {(size, decoder, "decode"), (size, decoder, "decode + train transform")} <= cpu
    assert ("cifar 32x32 in memory", "(none)", "train transform") in cpu
    assert all(r["images_per_s"] > 0 for r in rows)
    # the JPEGs it writes are of about a photo's size at quality 90, larger for larger images
    kb = {r["images"]: r["file_kb"] for r in rows if r["decoder"] == "PIL"}
    assert 10 < kb["places365 256x256"] < kb["imagenet 500x375"] < kb["inat 800x600"] < 400


def test_cluster_load_percentiles_and_summary():
    load = _load("cluster_load")
    assert load.percentile([], 99) == 0.0
    assert load.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert load.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert load.percentile([float(i) for i in range(1, 101)], 50) == 50.0
    result = {
        "clients": 2,
        "duration_s": 5.0,
        "requests": {"log_batch": 8, "artifact": 2},
        "p50_ms": {"log_batch": 12.0, "artifact": 40.0},
        "p99_ms": {"log_batch": 30.0, "artifact": 80.0},
        "status_5xx": 0,
        "retries": 1,
        "failed": 0,
        "peak_connections": {"mlflow": 6},
    }
    assert load.summary(result) == (
        "N=2 5s: log_batch n=8 p50=12ms p99=30ms artifact n=2 p50=40ms p99=80ms; 5xx 0, retries 1, "
        "failed 0; peak connections: mlflow 6"
    )


@pytest.mark.slow
def test_cluster_load_runs_against_the_local_stack(tmp_path):
    """benchmarks/cluster_load.py --local-stack for a few seconds with two clients: PostgreSQL and
    the MLflow server from docker-compose.yml's commands, the searcher's login; every request
    succeeds and the MLflow server's connections, seen in pg_stat_activity, stay within its role's
    limit. Slow: it starts PostgreSQL and the MLflow server (about half a minute)."""
    from cluster_fixtures import postgres_unavailable

    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "load.json"
    argv = ["--local-stack", "--workdir", str(tmp_path / "stack"), "--clients", "2", "--duration", "6"]
    argv += ["--artifact-period", "3", "--artifact-mb", "0.5", "--out", str(out)]
    (tmp_path / "stack").mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cluster_load.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed"] == 0 and result["status_5xx"] == 0, result["errors"]
    assert result["requests"]["log_batch"] >= 2 and result["requests"]["artifact"] >= 2, result
    assert 0 < result["p50_ms"]["log_batch"] <= result["p99_ms"]["log_batch"]
    assert 0 < result["peak_connections"]["mlflow"] <= 65  # docs/cluster.md's budget for the role
    assert set(result["peak_connections"]) <= {"mlflow", "(total)"}  # nothing else connects
    assert proc.stdout.strip().splitlines()[-1].startswith("N=2 ")
