"""FLOPs of a training step with torch.utils.flop_counter, counting SDPA on every device.

torch's counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA uses here,
so the CPU forward and backward are mapped onto torch's own SDPA formulas.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def _custom_mapping() -> dict:
    mapping = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        mapping[fwd] = _cpu_sdpa
    if bwd is not None:
        mapping[bwd] = _cpu_sdpa_backward
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of calling ``fn()`` (forward and whatever backward it runs)."""
    with fc.FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return counter.get_total_flops()
