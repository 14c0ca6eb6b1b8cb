"""Losses of LPT: Gaussian-clouded logit loss (GCL), its asymmetric variant (A-GCL), the branch weight.

GCL perturbs every class's cosine logit, the target's included (as the released ``AGCL`` does:
its noise covers the whole logit matrix), by Gaussian noise whose amplitude grows towards the tail
of class j, ``noise_mul * |N(0, 1/3)|.clamp(-1, 1) * (log n_max - log n_j) / (log n_max - log n_min)``,
subtracts a margin on the target logit and scales by ``s``. A-GCL replaces cross-entropy with the
asymmetric single-label loss: the log-softmax weighted by ``(1 - p)^gamma_pos`` on the target and
``p^gamma_neg`` on the others, with label smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def branch_weight(epoch: int, epochs: int) -> float:
    """Weight of the instance-balanced branch: w(e) = max(0, 0.5 * (E - e) / E)."""
    return max(0.0, 0.5 * (epochs - epoch) / epochs)


class AsymmetricGCL(nn.Module):
    """A-GCL on cosine logits in [-1, 1]; with gamma_pos = gamma_neg = 0 and no smoothing it is GCL.

    The noise comes from ``generator`` (seedable); pass ``noise_mul=0`` for a deterministic loss.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        margin: float = 0.1,
        scale: float = 20.0,
        noise_mul: float = 0.5,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        label_smoothing: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        if counts.numel() < 1 or bool((counts < 1).any()):
            raise ValueError("class_counts: every class needs at least one training image")
        log_n = counts.log()
        spread = float(log_n.max() - log_n.min())
        # All classes equally frequent: no cloud (the reference divides by zero here).
        amplitude = (log_n.max() - log_n) / spread if spread > 0 else torch.zeros_like(log_n)
        self.register_buffer("noise_amplitude", amplitude.float(), persistent=False)
        for name, value in (
            ("margin", margin),
            ("scale", scale),
            ("noise_mul", noise_mul),
            ("gamma_pos", gamma_pos),
            ("gamma_neg", gamma_neg),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {label_smoothing}")
        self.margin, self.scale, self.noise_mul = margin, scale, noise_mul
        self.gamma_pos, self.gamma_neg, self.label_smoothing = gamma_pos, gamma_neg, label_smoothing
        self.generator = generator

    def gcl_logits(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """s * (cos - cloud - m * onehot): the logits the asymmetric loss is applied to."""
        cosine = cosine.float()
        onehot = F.one_hot(targets, cosine.shape[1]).to(cosine.dtype)
        logits = cosine - self.margin * onehot
        if self.noise_mul > 0:
            gen = self.generator
            device = gen.device if gen is not None else cosine.device
            noise = torch.randn(cosine.shape, generator=gen, device=device).to(cosine.device)
            cloud = (noise / 3.0).clamp(-1, 1).abs() * self.noise_amplitude.to(cosine.device)
            logits = logits - self.noise_mul * cloud
        return self.scale * logits

    def asymmetric_weight(self, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(1 - p)^gamma_pos`` on the target, ``p^gamma_neg`` elsewhere, as the released loss
        takes it: the base first (``1 - p`` or ``p``), then one power. Powering both bases and
        selecting after would give 0 * inf = NaN gradients for a saturated class (p == 1); the
        target's base is kept >= 1e-12 so a saturated target stays finite too (no value changes:
        in fp32, 1 - p is either 0 or >= 6e-8)."""
        base = torch.where(target, (1 - p).clamp(min=1e-12), p)
        exponent = torch.where(target, self.gamma_pos, self.gamma_neg).to(p.dtype)
        return base.pow(exponent)

    def forward(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.gcl_logits(cosine, targets)
        num_classes = logits.shape[1]
        log_p = logits.log_softmax(dim=1)
        onehot = F.one_hot(targets, num_classes).to(log_p.dtype)
        if self.gamma_pos > 0 or self.gamma_neg > 0:
            log_p = log_p * self.asymmetric_weight(log_p.exp(), onehot.bool())
        smooth = onehot * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        return -(smooth * log_p).sum(dim=1).mean()
