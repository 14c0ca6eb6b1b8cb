"""The plain two-pass phase-2 forward of the reference code, for tests and benchmarks only.

It runs the query pass through all blocks and then the whole main pass from the input again,
so blocks below ``group_start`` run twice, and every block runs on tokens plus prompts in full
(``plain_block``). ``LPT.forward`` must give the same numbers with less work.
"""

from __future__ import annotations

import torch

from .model import LPT, plain_block


def plain_forward(model: LPT, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = model._embed(images)
    batch = tokens.shape[0]
    if model.phase == 1:
        x = tokens
        for i in range(model.depth):
            x = plain_block(model.backbone.blocks[i], x, model._shared(i, batch))
        return model.classify(model._features(x)), {}
    with torch.no_grad():
        q = tokens
        for i in range(model.depth):
            q = plain_block(model.backbone.blocks[i], q, model._shared(i, batch))
        query = model._features(q)
    idx, cos = model.match(query)
    group = model.group_prompts[idx].mean(dim=1)  # the reference's gather; equal to the model's
    x = tokens
    for i in range(model.depth):
        prompts = model._shared(i, batch)
        if i >= model.group_start:
            prompts = torch.cat([prompts, group[:, i - model.group_start]], dim=1)
        x = plain_block(model.backbone.blocks[i], x, prompts)
    per_image = cos.sum(dim=1)
    return model.classify(model._features(x)), {
        "match": per_image.sum() / batch,
        "match_per_image": per_image,
        "prompt_idx": idx,
    }
