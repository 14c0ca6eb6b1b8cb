#!/usr/bin/env python
"""Training-step and evaluation throughput of LPT: the reference two-pass computation against the
lean shared-trunk one, with FLOPs per image and (on CUDA) the fraction of a dense bf16 matmul peak.

Variants, all measured in one run on fixed, pre-made tensors (no data loading is timed):

- ``reference``: the reference code's computation in fp32. Phase 2 runs the plain two-pass forward
  (``lpt_core.reference.plain_forward``: the query pass and then the whole main pass, so blocks
  below ``group_start`` run twice), and each sampling branch (class-balanced, instance-balanced) is
  its own forward and backward pass; one SGD-momentum step per training step.
- ``reference+bf16`` (CUDA only): the same under bf16 autocast.
- ``lean``: ``LPT.forward`` (shared trunk, prompts as keys and values only) through
  ``lpt_core.Trainer.train_step``: both branches as one concatenated batch, fused SGD on CUDA; bf16
  autocast on CUDA, fp32 on CPU.
- ``lean+compile`` (``--compile``): the lean variant with ``torch.compile`` on the per-block
  function (``--compile-target blocks``, default: ``LPT.compile_blocks``, what ``Trainer(compile=True)``
  does) or on the whole LPT module (``--compile-target model``).

After the table: the input pipeline's images/s at the same size and batch (CIFAR-format images
through ``gpu_augment`` on CUDA, the CPU transforms on CPU) next to the lean phase-2 step's.
- ``timm``: inference of the plain timm ViT alone (no prompts), the ceiling for evaluation.

Phases: ``phase2`` and ``phase1`` training steps (forward, loss, backward, optimizer step) and
``eval`` (phase-2 model, no grad). Images/s count both branches of a training step (2 x batch).
Timing: every measurement's warm-up calls, then ``--steps`` rounds of one call of each measurement
(interleaved, so a drift of a shared machine hits all variants alike) and the median per
measurement; CUDA events with a synchronize on GPU, ``time.perf_counter`` on CPU.

FLOPs are counted with ``lpt_core.flops.count_flops`` (matmul, convolution and attention of the
forward and backward; optimizer and element-wise ops are not counted) on fake tensors: shapes only,
no arithmetic, so counting at ViT-B/16 sizes takes seconds even on a small CPU. ``--flops-size``
(default ``vit_b16``) counts at a second size besides the timed one.

    python benchmarks/step_throughput.py                       # CPU: vit_ti16 at 96 px, ~40 s
    python benchmarks/step_throughput.py --compile --out r.json  # CUDA: ViT-B/16 224 px
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from lpt_core import LPT, PhaseConfig, Trainer, build_backbone  # noqa: E402
from lpt_core.config import LPTConfig  # noqa: E402
from lpt_core.data import build_dataset  # noqa: E402
from lpt_core.flops import count_flops  # noqa: E402
from lpt_core.reference import plain_forward  # noqa: E402
from lpt_core.trainer import branch_losses, dual_batch_loss, resolve_device  # noqa: E402

NUM_CLASSES = 100
PHASES = ("phase2", "phase1", "eval")


@dataclass(frozen=True)
class Size:
    """A named backbone: timm model name, native image size and ``timm.create_model`` overrides."""

    model: str
    image_size: int
    overrides: dict = field(default_factory=dict)


SIZES = {
    "vit_b16": Size("vit_base_patch16_224", 224),
    "vit_s16": Size("vit_small_patch16_224", 224),
    "vit_ti16": Size("vit_tiny_patch16_224", 224),
    "tiny": Size("vit_tiny_patch16_224", 32, dict(patch_size=8, depth=4, embed_dim=96, num_heads=3)),
}
# Defaults per device: (size, image size, batch per branch, warm-up calls, timed calls).
CUDA_DEFAULTS = ("vit_b16", None, 128, 5, 20)
CPU_DEFAULTS = ("vit_ti16", 96, 8, 2, 8)


# --------------------------------------------------------------------------------------- model
def build_lpt(
    size: Size,
    image_size: int,
    *,
    prompt_length: int = LPTConfig.default("prompt_length"),
    pool_size: int = LPTConfig.default("pool_size"),
    top_k: int = LPTConfig.default("top_k"),
    group_start: int | None = None,
    num_classes: int = NUM_CLASSES,
) -> LPT:
    """LPT around a randomly initialised backbone (no downloads); L, P, K default to ``LPTConfig``'s,
    S to depth // 2 (``LPTConfig``'s 6 for the 12 blocks of ViT-B, and valid at any depth)."""
    backbone = build_backbone(size.model, "random", img_size=image_size, **size.overrides)
    depth = len(backbone.blocks)
    return LPT(
        backbone,
        num_classes,
        prompt_length=prompt_length,
        pool_size=pool_size,
        top_k=top_k,
        group_start=depth // 2 if group_start is None else group_start,
    )


class ReferenceStep:
    """A training step as the reference code takes it: each sampling branch runs its own forward
    (``plain_forward``: two passes in phase 2) and its own backward; then one SGD-momentum step."""

    def __init__(self, model: LPT, phase: int, cfg: PhaseConfig, losses: tuple, *, amp: bool):
        self.model, self.phase, self.cfg, self.amp = model, phase, cfg, amp
        self.loss_cb, self.loss_ib = losses
        model.set_phase(phase)
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.SGD(
            self.params, lr=cfg.lr * cfg.batch_size / 256, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, w: float) -> torch.Tensor:
        half = images.shape[0] // 2
        total = torch.zeros((), device=images.device)
        branches = ((slice(0, half), self.loss_cb, 1.0), (slice(half, None), self.loss_ib, w))
        for part, loss_fn, weight in branches:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits, aux = plain_forward(self.model, images[part])
            loss = loss_fn(logits, labels[part])
            if self.phase == 2:
                loss = loss - self.cfg.match_weight * aux["match"]
            (weight * loss).backward()
            total = total + weight * loss.detach()
        return total

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, w: float) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(images, labels, w)
        self.optimizer.step()
        return loss


def lean_forward_backward(
    model: LPT, cfg: PhaseConfig, losses: tuple, images: torch.Tensor, labels: torch.Tensor, w: float
) -> torch.Tensor:
    """The forward, loss and backward of ``Trainer.train_step`` (used to count its FLOPs on fake
    tensors, where a ``Trainer`` cannot be built)."""
    logits, aux = model(images)
    loss = dual_batch_loss(logits, aux, labels, losses, w, cfg.match_weight)
    loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------------------- FLOPs
def count_variant_flops(
    size: Size, image_size: int, prompt_kwargs: dict, batch: int = 2, phases: tuple[str, ...] = PHASES
) -> dict[str, dict[str, float]]:
    """GFLOP per image of each variant and phase, ``{variant: {phase: gflop}}``.

    Counted on fake CPU tensors (the model is built on the meta device, then given fake storage):
    the same kernels are chosen as on a real CPU run, so the counts equal a real count, but no
    arithmetic runs; the cost is Python dispatch, a few seconds at any size. ``batch`` is per
    branch; the counts are divided by the 2 x batch images. ``timm`` is counted with ``eval``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = PhaseConfig(batch_size=batch)
    losses = branch_losses(list(range(NUM_CLASSES, 0, -1)), cfg)  # real buffers, built outside fake mode
    with torch.device("meta"):
        model = build_lpt(size, image_size, **prompt_kwargs)
    n = 2 * batch
    out: dict[str, dict[str, float]] = {"reference": {}, "lean": {}, "timm": {}}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        images = torch.randn(n, 3, image_size, image_size)
        labels = torch.zeros(n, dtype=torch.long)
        w = 0.5
        for phase in (2, 1):
            if f"phase{phase}" not in phases:
                continue
            model.set_phase(phase).train()
            ref = ReferenceStep(model, phase, cfg, losses, amp=False)
            out["reference"][f"phase{phase}"] = (
                count_flops(lambda ref=ref: ref.forward_backward(images, labels, w)) / n / 1e9
            )
            out["lean"][f"phase{phase}"] = (
                count_flops(lambda: lean_forward_backward(model, cfg, losses, images, labels, w)) / n / 1e9
            )
        if "eval" in phases:
            model.set_phase(2).eval()
            with torch.no_grad():
                out["reference"]["eval"] = count_flops(lambda: plain_forward(model, images)) / n / 1e9
                out["lean"]["eval"] = count_flops(lambda: model(images)) / n / 1e9
                out["timm"]["eval"] = count_flops(lambda: model.backbone(images)) / n / 1e9
    out["reference+bf16"] = dict(out["reference"])
    out["lean+compile"] = dict(out["lean"])
    return out


def flops_summary(
    name: str, size: Size, image_size: int, prompt_kwargs: dict, phases: tuple[str, ...] = PHASES
) -> dict:
    """FLOP counts at one size, with the lean / reference ratios of the phase-2 step and eval."""
    start = time.perf_counter()
    per = count_variant_flops(size, image_size, prompt_kwargs, phases=phases)
    ratio = lambda phase: (
        per["lean"][phase] / per["reference"][phase]  # noqa: E731
        if phase in per["reference"]
        else None
    )
    return {
        "size": name,
        "model": size.model,
        "image_size": image_size,
        "gflop_per_image": {v: per[v] for v in ("reference", "lean", "timm")},
        "phase2_ratio_lean_over_reference": ratio("phase2"),
        "eval_ratio_lean_over_reference": ratio("eval"),
        "count_seconds": time.perf_counter() - start,
        "_per_variant": per,
    }


# --------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events and a synchronize on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_all(plan: list[tuple], device: torch.device, warmup: int, steps: int) -> dict:
    """Time every ``(key, setup, fn)`` of ``plan``: its warm-up calls first (the first one timed on
    its own: it holds any compilation), then ``steps`` rounds of one call of each, so that a drift
    of a shared machine hits all variants alike. Returns ``{key: {seconds (median), min_seconds,
    first_seconds}}``."""
    first = {}
    for key, setup, fn in plan:
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        first[key] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            fn()
        _sync(device)
        print(f"  warmed up {' '.join(key):22s} first call {first[key]:.2f} s", flush=True)
    times: dict = {key: [] for key, _, _ in plan}
    for _ in range(steps):
        for key, setup, fn in plan:
            setup()
            times[key].append(time_call(fn, device))
    return {
        key: {"seconds": statistics.median(t), "min_seconds": min(t), "first_seconds": first[key]}
        for key, t in times.items()
    }


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Achieved TFLOP/s of dense bf16 ``n x n @ n x n`` matmuls: the practical peak of the chip."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b, c
    return 2 * n**3 * iters / seconds / 1e12


class OtherLoad:
    """Cores kept busy by other processes over an interval: all busy CPU time in /proc/stat minus
    this process's own (Linux only; ``cores()`` is None elsewhere)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            return sum(values), sum(values) - values[3] - values[4], int(own[11]) + int(own[12])
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] == self.start[0]:
            return None
        total, busy, own = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / total) * (os.cpu_count() or 1)


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes while this one sleeps ``seconds``."""
    probe = OtherLoad()
    time.sleep(seconds)
    return probe.cores()


def compile_lean(model: LPT, target: str) -> LPT:
    """A copy of ``model`` with torch.compile on its per-block function or on the whole module."""
    compiled = copy.deepcopy(model)
    if target == "blocks":
        return compiled.compile_blocks()
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(64, dynamo_config.recompile_limit)  # shape x grad mode x phase
    compiled.compile(dynamic=False)
    return compiled


def input_throughput(device: torch.device, image_size: int, batch: int, batches: int = 6) -> dict:
    """Images/s of the input path that feeds a training step of this size: CIFAR-format uint8
    images through ``gpu_augment`` on CUDA (crop, flip, resize on the device), through the CPU
    transforms on CPU; one loader process, as in the step's own measurement."""
    import tempfile

    from benchmarks.input_pipeline import measure, write_cifar100

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100(tmp)
        gpu = device.type == "cuda"
        data = build_dataset(
            {
                "name": "cifar100_lt",
                "root": tmp,
                "imbalance_ratio": 10,
                "val_per_class": 5,
                "image_size": image_size,
                "gpu_augment": gpu,
            }
        )
        return {
            "path": "cifar100_lt format, " + ("gpu_augment on the device" if gpu else "CPU transforms"),
            "loader_workers": 0,
            "batch": 2 * batch,
            "images_per_s": measure(data, device, 0, 2 * batch, batches),
        }


# --------------------------------------------------------------------------------------- run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="backbone size to time (default: vit_b16 on CUDA, vit_ti16 on CPU)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image size in pixels (default: the size's native one; 96 for the CPU default)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per branch; a training step takes 2x (default: 128 on CUDA, 8 on CPU)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed calls per measurement (20 CUDA / 8 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement (5 CUDA / 2 CPU)")
    p.add_argument("--prompt-length", type=int, default=LPTConfig.default("prompt_length"), help="L")
    p.add_argument("--pool-size", type=int, default=LPTConfig.default("pool_size"), help="P")
    p.add_argument("--top-k", type=int, default=LPTConfig.default("top_k"), help="K")
    p.add_argument("--group-start", type=int, default=None, help="S (default: depth // 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time the lean variant under torch.compile")
    p.add_argument(
        "--compile-target",
        choices=("blocks", "model"),
        default="blocks",
        help="compile each backbone block (default) or the whole LPT module",
    )
    p.add_argument(
        "--flops-size",
        default="vit_b16",
        help="also count FLOPs at this size, at its native image size ('none' to skip)",
    )
    p.add_argument("--no-peak", action="store_true", help="CUDA: skip the bf16 matmul peak measurement")
    p.add_argument("--no-input", action="store_true", help="skip the input-pipeline images/s")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.flops_size != "none" and args.flops_size not in SIZES:
        p.error(f"--flops-size: one of {', '.join(sorted(SIZES))} or none")
    for name in ("batch_size", "steps", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def format_table(rows: list[dict], cuda: bool) -> str:
    head = ["variant", "precision", "phase", "img/s", "GFLOP/img", "achieved TFLOP/s"]
    if cuda:
        head.append("fraction of peak")
    head.append("speedup vs reference")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["variant"],
            r["precision"],
            r["phase"],
            _fmt(r["images_per_s"]),
            _fmt(r["gflop_per_image"]),
            _fmt(r["achieved_tflops"]),
        ]
        if cuda:
            cells.append(_fmt(r["fraction_of_peak"], 2))
        cells.append(f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with command-line ``argv``; print the table and return the results."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Settings:
    """What one benchmark run times: the device, the backbone size, image size, batch and counts."""

    device: torch.device
    size_name: str
    size: Size
    image_size: int
    batch: int
    warmup: int
    steps: int
    prompt_kwargs: dict

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The command line's choices, with the device's defaults for what it leaves out."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.compile and not cuda:
        print("note: --compile on CPU uses inductor's C++ backend; compiling takes minutes", flush=True)
    d_size, d_image, d_batch, d_warmup, d_steps = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    size_name = args.size or d_size
    size = SIZES[size_name]
    return Settings(
        device=device,
        size_name=size_name,
        size=size,
        image_size=args.image_size or (d_image if args.size is None and d_image else size.image_size),
        batch=args.batch_size or d_batch,
        warmup=d_warmup if args.warmup is None else args.warmup,
        steps=args.steps or d_steps,
        prompt_kwargs=dict(
            prompt_length=args.prompt_length, pool_size=args.pool_size, top_k=args.top_k, group_start=args.group_start
        ),
    )


def count_all_flops(args: argparse.Namespace, s: Settings) -> tuple[dict, dict]:
    """FLOPs (seconds, no device) at the timed size and at --flops-size; and the timed size's
    GFLOP per image of each variant and phase."""
    flops = {"timed": flops_summary(s.size_name, s.size, s.image_size, s.prompt_kwargs)}
    per_variant = flops["timed"].pop("_per_variant")
    if args.flops_size != "none":
        fsize = SIZES[args.flops_size]
        if (args.flops_size, fsize.image_size) == (s.size_name, s.image_size):
            flops["flops_size"] = flops["timed"]
        else:
            flops["flops_size"] = flops_summary(args.flops_size, fsize, fsize.image_size, s.prompt_kwargs)
            flops["flops_size"].pop("_per_variant")
    return flops, per_variant


class Workload:
    """The model, a tiny synthetic dataset (only for Trainer's samplers) and fixed tensors; and
    the (setup, call) pairs that time each variant's phases."""

    def __init__(self, s: Settings):
        self.s, device, batch = s, s.device, s.batch
        torch.manual_seed(0)
        self.model = build_lpt(s.size, s.image_size, **s.prompt_kwargs).to(device)
        self.data = build_dataset(
            {
                "name": "synthetic",
                "num_classes": NUM_CLASSES,
                "imbalance_ratio": 10,
                "max_per_class": 20,
                "image_size": s.image_size,
                "seed": 0,
            }
        )
        self.cfg = PhaseConfig(epochs=100, batch_size=batch)
        gen = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randn(2 * batch, 3, s.image_size, s.image_size, device=device, generator=gen)
        self.labels = torch.randint(0, NUM_CLASSES, (2 * batch,), device=device, generator=gen)
        self.w = 0.5  # the instance-balanced branch weight of the first epoch
        self.losses = tuple(
            loss.to(device)
            for loss in branch_losses(self.data.class_counts, self.cfg, torch.Generator(device=device).manual_seed(1))
        )

    def inference(self, forward: Callable, amp: bool) -> Callable[[], object]:
        def infer():
            with torch.no_grad(), torch.autocast(self.s.device.type, dtype=torch.bfloat16, enabled=amp):
                return forward(self.images)

        return infer

    def phase_runs(
        self, m: LPT, step: Callable[[int], object], forward: Callable, amp: bool
    ) -> dict[str, tuple[Callable, Callable]]:
        """(setup, call) per phase: the training steps ``step(phase)``, eval ``forward(images)``."""
        return {
            "phase2": (lambda: m.set_phase(2).train(), lambda: step(2)),
            "phase1": (lambda: m.set_phase(1).train(), lambda: step(1)),
            "eval": (lambda: m.set_phase(2).eval(), self.inference(forward, amp)),
        }

    def lean(self, m: LPT) -> dict[str, tuple[Callable, Callable]]:
        trainers = {p: Trainer(m, self.data, p, self.cfg, device=self.s.device, log=None) for p in (1, 2)}
        return self.phase_runs(m, lambda p: trainers[p].train_step(self.images, self.labels, self.w), m, self.s.cuda)

    def reference(self, m: LPT, amp: bool) -> dict[str, tuple[Callable, Callable]]:
        ref = {p: ReferenceStep(m, p, self.cfg, self.losses, amp=amp) for p in (1, 2)}
        return self.phase_runs(
            m, lambda p: ref[p](self.images, self.labels, self.w), lambda x: plain_forward(m, x), amp
        )

    def timm(self, m: LPT) -> dict[str, tuple[Callable, Callable]]:
        return {"eval": (lambda: m.eval(), self.inference(m.backbone, self.s.cuda))}

    def variants(self, args: argparse.Namespace) -> list[tuple[str, str, Callable[[], dict]]]:
        """(name, precision, make the runs) of every variant this run times, in table order."""
        model, cuda = self.model, self.s.cuda
        lean_precision = "bf16" if cuda else "fp32"
        out = [("reference", "fp32", lambda: self.reference(model, False))]
        if cuda:
            out.append(("reference+bf16", "bf16", lambda: self.reference(model, True)))
        out.append(("lean", lean_precision, lambda: self.lean(model)))
        if args.compile:
            out.append(("lean+compile", lean_precision, lambda: self.lean(compile_lean(model, args.compile_target))))
        out.append(("timm", lean_precision, lambda: self.timm(model)))
        return out


def time_variants(work: Workload, variants: list, per_variant: dict) -> tuple[list[dict], float | None]:
    """Time every (variant, phase); one row each. Returns the rows and, on the CPU, how many
    cores other processes kept busy meanwhile."""
    s = work.s
    plan, precisions = [], {}
    for variant, precision, make in variants:
        precisions[variant] = precision
        runs = make()
        plan += [((variant, phase), *runs[phase]) for phase in PHASES if phase in runs]
    others = OtherLoad()
    timings = measure_all(plan, s.device, s.warmup, s.steps)
    rows: list[dict] = []
    for (variant, phase), _, _ in plan:
        t = timings[(variant, phase)]
        ips = 2 * s.batch / t["seconds"]
        gflop = per_variant[variant][phase]
        rows.append(
            {
                "variant": variant,
                "precision": precisions[variant],
                "phase": phase,
                "seconds_per_step": t["seconds"],
                "min_seconds": t["min_seconds"],
                "first_call_seconds": t["first_seconds"],
                "images_per_step": 2 * s.batch,
                "images_per_s": ips,
                "gflop_per_image": gflop,
                "achieved_tflops": ips * gflop / 1e3,
                "fraction_of_peak": None,
                "speedup_vs_reference": None,
            }
        )
    work.model.set_phase(2).eval()
    return rows, None if s.cuda else others.cores()


def add_ratios(rows: list[dict], args: argparse.Namespace, s: Settings) -> float | None:
    """Speed-up over the reference per row and, on CUDA, the fraction of the matmul peak (returned)."""
    peak = None
    if s.cuda and not args.no_peak:
        peak = matmul_peak_tflops(s.device)
        print(f"  dense bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    base = {r["phase"]: r["images_per_s"] for r in rows if r["variant"] == "reference"}
    for r in rows:
        r["speedup_vs_reference"] = r["images_per_s"] / base[r["phase"]] if r["phase"] in base else None
        if peak:
            r["fraction_of_peak"] = r["achieved_tflops"] / peak
    return peak


def images_per_s(rows: list[dict], variant: str) -> dict[str, float]:
    return {r["phase"]: r["images_per_s"] for r in rows if r["variant"] == variant}


def compile_summary(rows: list[dict], args: argparse.Namespace) -> dict | None:
    if not args.compile:
        return None
    eager, comp = images_per_s(rows, "lean"), images_per_s(rows, "lean+compile")
    ratios = {p: comp[p] / eager[p] for p in comp}
    return {
        "target": args.compile_target,
        "speedup_over_lean": ratios,
        "wins": all(v > 1.0 for v in ratios.values()),
        "first_call_seconds": {r["phase"]: r["first_call_seconds"] for r in rows if r["variant"] == "lean+compile"},
    }


def best_lean(rows: list[dict], phase: str) -> float:
    """The faster of lean and lean+compile in ``phase`` (0 if neither ran)."""
    return max(images_per_s(rows, "lean").get(phase, 0.0), images_per_s(rows, "lean+compile").get(phase, 0.0))


def feed_summary(rows: list[dict], args: argparse.Namespace, s: Settings) -> dict | None:
    """The input pipeline's img/s against the best lean phase-2 step."""
    if args.no_input:
        return None
    feed = input_throughput(s.device, s.image_size, s.batch)
    best_step = best_lean(rows, "phase2")
    feed["over_phase2_step"] = feed["images_per_s"] / best_step if best_step else None
    return feed


def target_summary(rows: list[dict], s: Settings) -> dict | None:
    """ViT-B/16 at 224 on CUDA: the img/s goals of the lean step per phase."""
    if not (s.cuda and s.size_name == "vit_b16" and s.image_size == 224):
        return None
    return {
        p: {"target": goal, "best_images_per_s": best_lean(rows, p), "met": best_lean(rows, p) >= goal}
        for p, goal in (("phase2", 4000), ("phase1", 3500))
    }


def run_config(args: argparse.Namespace, s: Settings, model: LPT, busy, busy_during) -> dict:
    return {
        "size": s.size_name,
        "model": s.size.model,
        "image_size": s.image_size,
        "batch_per_branch": s.batch,
        "images_per_step": 2 * s.batch,
        "warmup": s.warmup,
        "steps": s.steps,
        "num_classes": NUM_CLASSES,
        "prompt_length": model.prompt_length,
        "pool_size": model.pool_size,
        "top_k": model.top_k,
        "group_start": model.group_start,
        "depth": model.depth,
        "width": model.width,
        "device": str(s.device),
        "device_name": torch.cuda.get_device_name(s.device)
        if s.cuda
        else f"{platform.machine()} {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "busy_cores_before": busy,
        "busy_cores_during": busy_during,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "compile": args.compile,
        "compile_target": args.compile_target if args.compile else None,
        "date": _dt.date.today().isoformat(),
    }


def print_summary(result: dict, rows: list[dict], args: argparse.Namespace, s: Settings) -> None:
    config, flops = result["config"], result["flops"]
    compile_result, feed, targets = result["compile"], result["input"], result["targets"]
    cfg_line = (
        f"{s.size_name} ({s.size.model}, {s.image_size}px, depth {config['depth']}, width {config['width']}), "
        f"L={config['prompt_length']} P={config['pool_size']} K={config['top_k']} S={config['group_start']}, "
        f"{NUM_CLASSES} classes, batch 2x{s.batch}, median of {s.steps} after {s.warmup} warm-up, "
        f"{config['device_name']}, {torch.get_num_threads()} threads"
    )
    print(f"\n{cfg_line}\n")
    print(format_table(rows, s.cuda))
    shown = [flops["timed"]] + ([flops["flops_size"]] if flops.get("flops_size") not in (None, flops["timed"]) else [])
    for f in shown:
        g = f["gflop_per_image"]
        print(
            f"\nGFLOP/img at {f['size']} {f['image_size']}px (fwd+bwd matmul/conv/attention): "
            f"phase-2 step lean {g['lean']['phase2']:.4g} / reference {g['reference']['phase2']:.4g} "
            f"= {f['phase2_ratio_lean_over_reference']:.3f} (lean / reference); "
            f"phase-1 step {g['lean']['phase1']:.4g}; eval lean {g['lean']['eval']:.4g} / "
            f"reference {g['reference']['eval']:.4g}; timm inference {g['timm']['eval']:.4g}"
        )
    if compile_result:
        ratios = ", ".join(f"{p} {v:.2f}x" for p, v in compile_result["speedup_over_lean"].items())
        print(
            f"\ntorch.compile ({args.compile_target}) over eager lean: {ratios} -> "
            f"{'wins' if compile_result['wins'] else 'does not win everywhere'}"
        )
    if feed:
        print(
            f"\ninput pipeline ({feed['path']}, batch {feed['batch']}, {feed['loader_workers']} loader "
            f"workers): {feed['images_per_s']:,.0f} img/s = {feed['over_phase2_step']:.1f}x the lean "
            f"phase-2 step ({'keeps up' if feed['over_phase2_step'] >= 1 else 'the step would wait for it'})"
        )
    if targets:
        print(
            "targets: "
            + ", ".join(
                f"{p} {t['best_images_per_s']:.0f} img/s (target {t['target']}: {'met' if t['met'] else 'not met'})"
                for p, t in targets.items()
            )
        )
    busy_during = config["busy_cores_during"]
    if busy_during is not None and busy_during > 0.25:
        print(
            f"\nwarning: other processes kept {busy_during:.1f} of {os.cpu_count()} cores busy during "
            "the timing: these CPU figures are not a clean measurement"
            + (" (with --compile this includes inductor's compile workers)" if args.compile else "")
        )
    print(f"\nwall time {result['wall_seconds']:.1f} s")


def _run(args: argparse.Namespace) -> dict:
    s = resolve_settings(args)
    run_start = time.perf_counter()
    busy = None if s.cuda else busy_cores()
    if busy is not None and busy > 0.5:
        print(
            f"warning: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: CPU timings "
            "will be low and noisy (OpenMP threads stall on busy cores; try --threads 1)",
            flush=True,
        )
    flops, per_variant = count_all_flops(args, s)
    work = Workload(s)
    variants = work.variants(args)
    rows, busy_during = time_variants(work, variants, per_variant)
    peak = add_ratios(rows, args, s)
    result = {
        "config": run_config(args, s, work.model, busy, busy_during),
        "variants": sorted({r["variant"] for r in rows}, key=[v[0] for v in variants].index),
        "results": rows,
        "peak_tflops": peak,
        "flops": flops,
        "compile": compile_summary(rows, args),
        "targets": target_summary(rows, s),
        "input": feed_summary(rows, args, s),
        "wall_seconds": time.perf_counter() - run_start,
    }
    print_summary(result, rows, args, s)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
