"""Training loop of LPT, one phase at a time, readable top to bottom.

``sampling: dual`` (the released recipe): each step loads one batch holding a class-balanced half
and an instance-balanced half (``sampling.DualBatchSampler``), runs it through the model once, and
takes ``AGCL_cb - m*match_cb + w(e) * (AGCL_ib - m*match_ib)``. ``sampling: instance``: each step
is ``batch_size`` shuffled images (``sampling.InstanceBatchSampler``) and the loss
``AGCL(gamma_pos, gamma_neg) - m*match``. The match terms only in phase 2.
SGD with momentum, lr = lr * batch / 256; ``warmup: epoch`` changes the lr once per epoch as the
released code steps timm's CosineLRScheduler (``released_epoch_lr``), ``warmup: step`` warms up
linearly per step from ``warmup_lr`` and then follows a per-step cosine.
bf16 autocast on CUDA, fp32 on CPU. The loss is summed on the device and read once per epoch.
``input_wait_fraction``: the share of the epoch's training time the loop spent waiting for the
loader's next batch (workers reading, decoding and augmenting on the CPU). The step's device work
is queued asynchronously on CUDA, so a GPU-bound loop blocks in the step and waits ~0 for data;
a data-bound one waits here while the GPU idles. An on-device decode (``gpu_decode``) counts as
step time, as it is GPU work.
After each epoch the validation split is evaluated and ``epochs()`` yields the metrics, where the
caller can report and ``trainer.save_state(path)`` (``fit`` runs them all, with an optional
``on_epoch(metrics, trainer)``); ``load_state`` resumes there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_state, save_state
from .config import PhaseConfig
from .data.base import LTData
from .losses import AsymmetricGCL, branch_weight
from .metrics import (
    GROUPS,
    confusion_counts,
    few_at_most,
    group_index,
    per_class_accuracy,
    shot_accuracy,
    shot_confusion_counts,
)
from .model import LPT
from .sampling import DualBatchSampler, InstanceBatchSampler


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_transform: Callable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``; apply the dataset's on-device transform if it has one."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return (batch_transform(images) if batch_transform is not None else images), labels


def make_loader(dataset: Dataset, device: torch.device, num_workers: int, **kwargs) -> DataLoader:
    kwargs.setdefault("collate_fn", getattr(dataset, "collate_fn", None))  # encoded-JPEG batches
    return DataLoader(
        dataset, num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, **kwargs
    )


def branch_losses(
    class_counts: list[int], cfg: PhaseConfig, generator: torch.Generator | None = None
) -> tuple[AsymmetricGCL, ...]:
    """The A-GCL of each branch of ``cfg``: one cloud, margin, scale and smoothing (and noise
    ``generator``); the class-balanced branch (or with ``sampling: instance`` the only one) with
    ``gamma_pos``/``gamma_neg``, the instance-balanced branch of dual sampling with ``ib_gamma_*``."""
    common = dict(
        class_counts=class_counts,
        margin=cfg.margin,
        scale=cfg.scale,
        noise_mul=cfg.noise_mul,
        label_smoothing=cfg.label_smoothing,
        generator=generator,
    )
    main = AsymmetricGCL(gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg, **common)
    if cfg.sampling == "instance":
        return (main,)
    return main, AsymmetricGCL(gamma_pos=cfg.ib_gamma_pos, gamma_neg=cfg.ib_gamma_neg, **common)


def branch_loss(
    loss_fn: AsymmetricGCL, logits: torch.Tensor, labels: torch.Tensor, match: torch.Tensor | None, match_weight: float
) -> torch.Tensor:
    """``AGCL - m*mean(match)`` of one branch (``match`` per image, None in phase 1)."""
    loss = loss_fn(logits, labels)
    return loss if match is None else loss - match_weight * match.mean()


def dual_batch_loss(
    logits: torch.Tensor,
    aux: dict,
    labels: torch.Tensor,
    losses: tuple[AsymmetricGCL, AsymmetricGCL],
    w: float,
    match_weight: float,
) -> torch.Tensor:
    """``AGCL_cb - m*match_cb + w * (AGCL_ib - m*match_ib)`` of a dual batch (class-balanced half
    first, ``losses`` as ``branch_losses`` gives them); the match terms where ``aux`` has them
    (phase 2)."""
    loss_cb_fn, loss_ib_fn = losses
    half = logits.shape[0] // 2
    match = aux.get("match_per_image")
    loss_cb = branch_loss(
        loss_cb_fn, logits[:half], labels[:half], None if match is None else match[:half], match_weight
    )
    loss_ib = branch_loss(
        loss_ib_fn, logits[half:], labels[half:], None if match is None else match[half:], match_weight
    )
    return loss_cb + w * loss_ib


def released_epoch_lr(epoch: int, epochs: int, peak_lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    """The lr of ``epoch`` (0-based) under the released code's schedule: timm's
    ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr)``
    (lr_min 0, no warm-up prefix, one cycle) stepped once per epoch. Written out with timm's
    arithmetic, so the values are equal to the bit."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * ((peak_lr - warmup_lr) / warmup_epochs)
    return 0.5 * peak_lr * (1 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def predict_batches(
    model: LPT, loader: DataLoader, device: torch.device, batch_transform: Callable | None = None, bf16: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """``(logits, labels, aux)`` of each batch of ``loader`` on ``device``: eval mode, no grad, bf16
    autocast on CUDA unless ``bf16`` is False; the model's training mode is restored when the loop ends."""
    was_training = model.training
    model.eval()
    try:
        for images, labels in loader:
            images, labels = to_device(images, labels, device, batch_transform)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                logits, aux = model(images)
            yield logits, labels, aux
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: LPT,
    dataset: Dataset,
    class_counts: list[int],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    loader: DataLoader | None = None,
    batch_transform: Callable | None = None,
    shot_split: str = "standard",
    bf16: bool = True,
) -> dict:
    """Accuracy (percent) overall and many/medium/few (``shot_split``: ``standard`` or the released
    script's ``released``; see ``metrics``), the per-class vector, ``shot_confusion`` [3, 3]
    (images of a many/medium/few class, rows, predicted as a class of each group, columns) and,
    in phase 2, ``prompt_usage`` [C, P]: how often images of each class selected each group prompt.
    bf16 autocast on CUDA unless ``bf16`` is False (fp32 throughout)."""
    device = device or next(model.parameters()).device
    loader = loader or make_loader(dataset, device, num_workers, batch_size=batch_size)
    c = model.num_classes
    correct = torch.zeros(c, dtype=torch.long, device=device)
    total = torch.zeros(c, dtype=torch.long, device=device)
    usage = torch.zeros(c, model.pool_size, dtype=torch.long, device=device)
    group = group_index(class_counts, shot_split).to(device)
    groups = torch.zeros(len(GROUPS), len(GROUPS), dtype=torch.long, device=device)
    for logits, labels, aux in predict_batches(model, loader, device, batch_transform, bf16):
        preds = logits.argmax(dim=1)
        ok, n = confusion_counts(preds, labels, c)
        groups += shot_confusion_counts(preds, labels, group)
        correct += ok
        total += n
        if "prompt_idx" in aux:
            idx = aux["prompt_idx"]
            rows = labels.unsqueeze(1).expand_as(idx).flatten()
            usage.index_put_((rows, idx.flatten()), torch.ones_like(rows), accumulate=True)
    out = shot_accuracy(correct, total, class_counts, shot_split)
    out["per_class"] = per_class_accuracy(correct.double().cpu(), total.double().cpu()).tolist()
    out["shot_confusion"] = groups.cpu().tolist()
    if model.phase == 2:
        out["prompt_usage"] = usage.cpu()
    return out


class Trainer:
    """Trains one phase of ``model`` on ``data`` with ``cfg``. ``compile=True`` (or a dict of
    ``torch.compile`` options) runs the blocks compiled (``LPT.compile_blocks``); the first steps
    then take the compile time."""

    def __init__(
        self,
        model: LPT,
        data: LTData,
        phase: int,
        cfg: PhaseConfig,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        num_workers: int = 0,
        eval_batch_size: int = 256,
        compile: bool | dict = False,
        shot_split: str = "standard",
        log: Callable[[str], None] | None = print,
    ):
        self.device = resolve_device(device)
        self.model, self.data, self.phase, self.cfg = model.to(self.device), data, phase, cfg
        self.model.set_phase(phase)
        if compile:
            self.model.compile_blocks(**(compile if isinstance(compile, dict) else {}))
        self.seed, self.num_workers, self.eval_batch_size = seed, num_workers, eval_batch_size
        self.shot_split = shot_split
        few_at_most(shot_split)  # a bad split fails here, not after the first epoch
        self.log = log or (lambda msg: None)
        self.class_counts = data.class_counts  # A-GCL's cloud
        self.shot_counts = data.shot_counts  # the many/medium/few groups (iNat: the full train list)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 7919 * phase)
        self.losses = tuple(loss.to(self.device) for loss in branch_losses(self.class_counts, cfg, self.noise_gen))
        sampler_seed = seed + 1009 * phase
        self.sampler = (
            DualBatchSampler(data.train_labels, data.num_classes, cfg.batch_size, cfg.per_class, seed=sampler_seed)
            if cfg.sampling == "dual"
            else InstanceBatchSampler(data.train_labels, cfg.batch_size, seed=sampler_seed)
        )
        self.loader = make_loader(data.train, self.device, num_workers, batch_sampler=self.sampler)
        self.val_loader = make_loader(data.val, self.device, num_workers, batch_size=eval_batch_size)
        self.params = self.model.trainable_parameters()
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=cfg.warmup_lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            fused=fused,
            foreach=None if fused else True,
        )
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch if cfg.epochs > cfg.warmup_epochs else 0
        self.peak_lr = cfg.lr * cfg.batch_size / 256
        self.step, self.epoch = 0, 0  # epoch = the next epoch to run
        self.history: list[dict] = []
        self.last_eval: dict | None = None  # evaluate()'s output of the last epoch run here

    # ------------------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        """The lr of optimiser step ``step`` (0-based), by ``cfg.warmup``."""
        cfg = self.cfg
        if cfg.warmup == "epoch":
            return released_epoch_lr(
                step // self.steps_per_epoch, cfg.epochs, self.peak_lr, cfg.warmup_epochs, cfg.warmup_lr
            )
        if step < self.warmup_steps:
            return cfg.warmup_lr + (self.peak_lr - cfg.warmup_lr) * step / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * self.peak_lr * (1 + math.cos(math.pi * t))

    # ------------------------------------------------------------------------- training
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, w: float) -> torch.Tensor:
        """One optimiser step on a batch of the sampler (dual: class-balanced half first; ``w`` the
        instance-balanced branch's weight, unused by instance sampling); returns the detached loss."""
        device = self.device
        images, labels = to_device(images, labels, device, self.data.train_batch_transform)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, aux = self.model(images)
        if self.cfg.sampling == "dual":
            loss = dual_batch_loss(logits, aux, labels, self.losses, w, self.cfg.match_weight)
        else:
            loss = branch_loss(self.losses[0], logits, labels, aux.get("match_per_image"), self.cfg.match_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.detach()

    def train_epoch(self) -> dict:
        cfg, device = self.cfg, self.device
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        w = branch_weight(self.epoch, cfg.epochs)
        loss_sum = torch.zeros((), device=device)
        images_seen, waited = 0, 0.0
        batches = iter(self.loader)
        start = time.perf_counter()
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked  # the step waits for its batch (loader workers, decoding)
            if batch is None:
                break
            images, labels = batch
            loss_sum += self.train_step(images, labels, w)
            images_seen += images.shape[0]
        train_loss = float(loss_sum) / self.steps_per_epoch  # the one host sync of the epoch
        seconds = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train_loss is {train_loss} in phase {self.phase} epoch {self.epoch}")
        return {
            "train_loss": train_loss,
            "images_per_s": images_seen / max(seconds, 1e-9),
            "input_wait_fraction": min(1.0, waited / max(seconds, 1e-9)),
            "lr": self.lr_at(max(0, self.step - 1)),
        }

    def epochs(self) -> Iterator[dict]:
        """Run the remaining epochs, yielding each one's metrics once it is trained and validated.
        While the caller holds them the trainer is at the end of that epoch: report, then
        ``save_state`` to resume from there."""
        if self.epoch == 0:
            counts = self.model.parameter_counts()
            cfg = self.cfg
            images = f"2x{cfg.batch_size}" if cfg.sampling == "dual" else f"{cfg.batch_size}"
            self.log(
                f"phase {self.phase}: {cfg.epochs} epochs x {self.steps_per_epoch} steps of "
                f"{images} images ({cfg.sampling} sampling, lr set per {cfg.warmup}) on {self.device}; LPT adds "
                f"{counts['extra_params']:,} parameters ({counts['extra_percent']:.2f}% of the backbone)"
            )
        while self.epoch < self.cfg.epochs:
            metrics = {"phase": self.phase, "epoch": self.epoch + 1, **self.train_epoch()}
            val = evaluate(
                self.model,
                self.data.val,
                self.shot_counts,
                device=self.device,
                loader=self.val_loader,
                batch_transform=self.data.eval_batch_transform,
                shot_split=self.shot_split,
            )
            metrics.update({f"val_{k}": v for k, v in val.items() if k.endswith("acc")})
            self.last_eval = val  # the model's last validation pass, for reports that need more than metrics
            self.epoch += 1
            self.history.append(metrics)
            self.log(
                f"phase {self.phase} epoch {self.epoch}/{self.cfg.epochs}: loss {metrics['train_loss']:.4f} "
                f"val {metrics['val_acc']:.2f}% (many {metrics['val_many_acc']:.1f} / medium "
                f"{metrics['val_medium_acc']:.1f} / few {metrics['val_few_acc']:.1f}) "
                f"{metrics['images_per_s']:.0f} img/s, input wait {metrics['input_wait_fraction']:.0%}"
            )
            yield metrics

    def fit(self, on_epoch: Callable[[dict, Trainer], None] | None = None) -> dict:
        """Run the remaining epochs (``epochs()``), calling ``on_epoch(metrics, trainer)`` after
        each; returns the last epoch's metrics."""
        metrics: dict = {}
        for metrics in self.epochs():
            if on_epoch is not None:
                on_epoch(metrics, self)
        return metrics

    # ------------------------------------------------------------------------- resume
    def save_state(self, path) -> None:
        """Prompts, momentum buffers, RNG states, step and epoch: enough to resume exactly."""
        tensors = {f"model.{k}": v for k, v in self.model.prompt_state_dict().items()}
        for i, p in enumerate(self.params):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.momentum.{i}"] = buf
        tensors["rng.cpu"] = torch.get_rng_state()
        tensors["rng.noise"] = self.noise_gen.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_state(
            path,
            tensors,
            {
                "phase": self.phase,
                "epoch": self.epoch,
                "step": self.step,
                "history": self.history,
                "recipe": self.cfg.to_dict(),
            },
        )

    def load_state(self, path) -> None:
        tensors, meta = load_state(path)
        if meta["phase"] != self.phase:
            raise ValueError(f"{path}: holds phase {meta['phase']}, not phase {self.phase}")
        self.model.load_prompt_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, p in enumerate(self.params):
            buf = tensors.get(f"optim.momentum.{i}")
            if buf is not None:
                self.optimizer.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype)
        torch.set_rng_state(tensors["rng.cpu"])
        self.noise_gen.set_state(tensors["rng.noise"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]
