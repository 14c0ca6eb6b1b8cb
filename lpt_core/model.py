"""The LPT model: a frozen timm VisionTransformer with shared prompts, a prompt pool and a cosine head.

Prompts are appended after the tokens at the input of a block and dropped from its output
(VPT-deep). Phase 1 trains the shared prompts and the head. Phase 2 freezes the shared prompts and
trains a pool of group prompts chosen per image by cosine matching of a query feature against
learnable keys. The blocks below ``group_start`` see the same input on the query path and on the
main path, so they run once and both paths branch from their output. Since the prompts' own outputs
are dropped, they enter each block as keys and values only (``prompted_block``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from .config import LPTConfig

PROMPT_KEYS = ("shared_prompts", "group_prompts", "group_keys", "head_weight")


def plain_block(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Block on tokens ``x`` [B, N, D] with ``prompts`` [B or 1, L, D] appended; the N token outputs."""
    prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)
    return block(torch.cat([x, prompts], dim=1))[:, : x.shape[1]]


def prompted_block(block: Block, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``plain_block`` without the work whose result it throws away.

    The prompt tokens' outputs are dropped after every block, so prompts only matter as keys and
    values: queries, attention rows, the projection and the MLP run for the N image tokens alone.
    Same numbers as ``plain_block`` (up to rounding) for a timm ``Block`` with ``Attention``.
    """
    attn = block.attn
    batch, n, _ = x.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    hx = block.norm1(x)  # queries from a contiguous tensor: a slice of h would cost a bmm and copies
    h = torch.cat([hx, block.norm1(prompts.to(x.dtype)).expand(batch, -1, -1)], dim=1)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(hx, w[:width], None if b is None else b[:width])
    kv = F.linear(h, w[width:], None if b is None else b[width:])
    q = attn.q_norm(q.view(batch, n, heads, head_dim).transpose(1, 2))
    k, v = kv.view(batch, h.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v)  # the backbone is frozen in eval: no dropout
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n, width)))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def supports_prompted_block(block: nn.Module) -> bool:
    """True for timm's own ``Block`` and ``Attention`` (not subclasses that change their forward)."""
    attn = getattr(block, "attn", None)
    return (
        type(block).forward is Block.forward
        and isinstance(block, Block)
        and isinstance(attn, Attention)
        and type(attn).forward is Attention.forward
        and getattr(attn, "gate", None) is None
    )


def unit_class_vectors(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The released ``NormedLinear`` init, in place: uniform(-1, 1), then each class vector (a row
    of ``weight`` [C, D]) scaled to norm 1."""
    with torch.no_grad():
        weight.uniform_(-1.0, 1.0, generator=generator)
        return weight.div_(weight.norm(dim=1, keepdim=True))


def init_generator(init_seed: int, component: str) -> torch.Generator:
    """The CPU generator that initialises one component (a ``PROMPT_KEYS`` name): seeded by
    sha256 of (init_seed, component), so each component has its own stream and its values depend
    on nothing else (not the global RNG, not the shape of the other components)."""
    digest = hashlib.sha256(f"lpt-init:{init_seed}:{component}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def prompt_init(shape: tuple[int, ...], init_seed: int, component: str) -> nn.Parameter:
    """trunc_normal(std 0.02) of ``shape`` from the component's own generator (released scale)."""
    return nn.Parameter(
        nn.init.trunc_normal_(torch.empty(shape), std=0.02, generator=init_generator(init_seed, component))
    )


class LPT(nn.Module):
    """Long-tailed Prompt Tuning around a frozen timm ``VisionTransformer`` with a class token.

    Args:
        backbone: a timm VisionTransformer (any depth, width, patch size) with a class token.
        num_classes: classes of the cosine classifier.
        prompt_length: prompt tokens per block, for shared and for group prompts (L).
        pool_size: group prompts in the pool (P).
        top_k: group prompts chosen per image and averaged (K).
        group_start: first block that receives group prompts (S), 1 <= S <= depth - 1.
        head_dropout: dropout before the cosine classifier while training.
        init_seed: seeds the initial values: shared prompts, group prompts, keys and class vectors
            each from its own generator (``init_generator``). The phase-1 tensors (shared prompts,
            class vectors) are therefore the same whatever ``pool_size``, ``top_k`` and
            ``group_start``, and the global torch RNG is neither read nor advanced.

    The defaults and ranges are ``LPTConfig``'s; ``LPT.from_config(backbone, num_classes, cfg)``
    takes one, and ``model.config`` is the one it was built with.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        prompt_length: int = LPTConfig.default("prompt_length"),
        pool_size: int = LPTConfig.default("pool_size"),
        top_k: int = LPTConfig.default("top_k"),
        group_start: int = LPTConfig.default("group_start"),
        head_dropout: float = LPTConfig.default("head_dropout"),
        init_seed: int = 0,
    ):
        super().__init__()
        if getattr(backbone, "cls_token", None) is None or not hasattr(backbone, "blocks"):
            raise ValueError(
                "backbone: LPT needs a timm VisionTransformer with a class token "
                "(class_token=True, global_pool='token')"
            )
        depth, width = len(backbone.blocks), backbone.embed_dim
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        self.config = LPTConfig.from_dict(
            dict(
                prompt_length=prompt_length,
                pool_size=pool_size,
                top_k=top_k,
                group_start=group_start,
                head_dropout=head_dropout,
            )
        )
        if not 1 <= group_start <= depth - 1:
            raise ValueError(f"group_start: must be in 1..depth-1={depth - 1}, got {group_start}")

        self.backbone = backbone.requires_grad_(False).eval()
        self.num_classes, self.prompt_length = num_classes, prompt_length
        self.pool_size, self.top_k, self.group_start = pool_size, top_k, group_start
        self.depth, self.width = depth, width

        # The released code's scales: prompts and keys trunc_normal(0.02), class vectors of norm 1.
        # Keys and class vectors are normalised before use, so their scale sets how fast SGD turns them.
        self.init_seed = init_seed
        self.shared_prompts = prompt_init((depth, prompt_length, width), init_seed, "shared_prompts")
        self.group_prompts = prompt_init(
            (pool_size, depth - group_start, prompt_length, width), init_seed, "group_prompts"
        )
        self.group_keys = prompt_init((pool_size, width), init_seed, "group_keys")
        # built on the meta device so that nn.Linear's own init draws nothing from the global RNG
        self.head = nn.Linear(width, num_classes, bias=False, device="meta").to_empty(device="cpu")
        unit_class_vectors(self.head.weight, init_generator(init_seed, "head_weight"))
        self.head_drop = nn.Dropout(head_dropout)
        self._block_fns = [prompted_block if supports_prompted_block(b) else plain_block for b in backbone.blocks]
        self.blocks_compiled = False
        self.phase = 1
        self.set_phase(1)

    @classmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, config: LPTConfig | dict, init_seed: int = 0) -> LPT:
        values = config.to_dict() if isinstance(config, LPTConfig) else dict(config)
        return cls(backbone, num_classes, **values, init_seed=init_seed)

    # ----------------------------------------------------------------------------- phases
    def set_phase(self, phase: int) -> LPT:
        """Phase 1 trains shared prompts + head; phase 2 trains group prompts, keys + head."""
        if phase not in (1, 2):
            raise ValueError(f"phase: must be 1 or 2, got {phase}")
        self.phase = phase
        self.shared_prompts.requires_grad_(phase == 1)
        self.group_prompts.requires_grad_(phase == 2)
        self.group_keys.requires_grad_(phase == 2)
        self.head.weight.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> LPT:
        super().train(mode)
        self.backbone.eval()  # frozen: its own dropout / drop-path stay off
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p for p in (self.shared_prompts, self.group_prompts, self.group_keys, self.head.weight) if p.requires_grad
        ]

    # ----------------------------------------------------------------------------- pieces
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def _block(self, i: int, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Run block i on tokens plus prompts ([B or 1, L', D]); return only the original tokens."""
        return self._block_fns[i](self.backbone.blocks[i], x, prompts)

    def _shared(self, i: int, batch: int) -> torch.Tensor:
        return self.shared_prompts[i].unsqueeze(0).expand(batch, -1, -1)

    def compile_blocks(self, **options) -> LPT:
        """``torch.compile`` the per-block function, once. Blocks of one structure share a compiled
        graph; grad mode and batch size add variants, hence the raised recompile limit."""
        if not self.blocks_compiled:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 8 * self.depth)
            options.setdefault("dynamic", False)
            compiled = {fn: torch.compile(fn, **options) for fn in set(self._block_fns)}
            self._block_fns = [compiled[fn] for fn in self._block_fns]
            self.blocks_compiled = True
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits class-token feature from the last block's tokens."""
        return self.backbone.forward_head(self.backbone.norm(x), pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine logits in [-1, 1], in fp32 under any autocast: normalised features times
        normalised class weights. (bf16 would round a cosine to 0.004 and break ties towards
        the lowest class index, the most frequent class of an LT dataset.)"""
        with torch.autocast(features.device.type, enabled=False):
            f = F.normalize(self.head_drop(features).float(), dim=-1)
            return f @ F.normalize(self.head.weight.float(), dim=-1).t()

    def match(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine between queries [B, D] and keys, in fp32 under any autocast:
        (indices [B, K], cosines [B, K])."""
        with torch.autocast(query.device.type, enabled=False):
            sim = F.normalize(query.float(), dim=-1) @ F.normalize(self.group_keys.float(), dim=-1).t()
            cos, idx = sim.topk(self.top_k, dim=1)
        return idx, cos

    def average_group_prompts(self, idx: torch.Tensor) -> torch.Tensor:
        """Mean of the chosen group prompts [B, d-S, L, D], as a selection-matrix product: its
        backward is a matmul (deterministic), not an index scatter-add."""
        select = torch.zeros(idx.shape[0], self.pool_size, device=idx.device, dtype=self.group_prompts.dtype).scatter_(
            1, idx, 1.0 / self.top_k
        )
        return (select @ self.group_prompts.flatten(1)).view(-1, *self.group_prompts.shape[1:])

    # ----------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return cosine logits [B, C] and aux: in phase 2 ``match`` (scalar: sum of top-k cosines
        over the batch / batch size), ``match_per_image`` [B] and ``prompt_idx`` [B, K]."""
        x = self._embed(images)
        batch = x.shape[0]
        if self.phase == 1:
            for i in range(self.depth):
                x = self._block(i, x, self._shared(i, batch))
            return self.classify(self._features(x)), {}

        # Phase 2: the trunk (blocks < S) has nothing trainable upstream; run it once, keep no graph.
        with torch.no_grad():
            for i in range(self.group_start):
                x = self._block(i, x, self._shared(i, batch))
            q = x
            for i in range(self.group_start, self.depth):
                q = self._block(i, q, self._shared(i, batch))
            query = self._features(q)
        idx, cos = self.match(query)
        match_per_image = cos.sum(dim=1)
        group = self.average_group_prompts(idx)
        for i in range(self.group_start, self.depth):
            prompts = torch.cat([self._shared(i, batch), group[:, i - self.group_start]], dim=1)
            x = self._block(i, x, prompts)
        aux = {"match": match_per_image.sum() / batch, "match_per_image": match_per_image, "prompt_idx": idx}
        return self.classify(self._features(x)), aux

    # ----------------------------------------------------------------------------- state
    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything LPT trains, detached: never the frozen backbone."""
        return {
            "shared_prompts": self.shared_prompts.detach(),
            "group_prompts": self.group_prompts.detach(),
            "group_keys": self.group_keys.detach(),
            "head_weight": self.head.weight.detach(),
        }

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy prompts in place; a wrong name or shape raises ValueError naming it."""
        own = self.prompt_state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"{unknown[0]}: not an LPT prompt tensor (expected {', '.join(PROMPT_KEYS)})")
        missing = sorted(set(own) - set(state))
        if strict and missing:
            raise ValueError(f"{missing[0]}: missing from the prompt state")
        for name in (k for k in PROMPT_KEYS if k in state):
            tensor = state[name]
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(own[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def parameter_counts(self) -> dict[str, float]:
        """Extra parameters LPT adds against the frozen backbone (all prompts, keys, head)."""
        extra = sum(t.numel() for t in self.prompt_state_dict().values())
        backbone = sum(p.numel() for p in self.backbone.parameters())
        return {"extra_params": extra, "backbone_params": backbone, "extra_percent": 100.0 * extra / backbone}
