"""Typed configuration: the model (``LPTConfig``) and the phase recipe (``PhaseConfig``), each
field with its default, range and whether a study may search it; plus the base class and the
one-line error formatter that every configuration model of the project shares (datasets, studies,
profiles).

The models are pydantic v2, strict (an integer field takes no ``3.0`` or ``"3"``, a flag no
``"yes"``), closed (an unknown key is an error that lists the known ones) and finite. Their JSON
Schema (``model_json_schema()``) carries ``"searchable": true|false`` on every field of
``LPTConfig`` and ``PhaseConfig``.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError


def param(default: Any, *, searchable: bool = True, why: str = "", **constraints: Any) -> Any:
    """A field with its default, its ``constraints`` (``ge``, ``gt``, ``le``, ``lt``...) and whether
    a study can search it (``why`` says why not; it is the error a study that tries gets)."""
    extra = {"searchable": searchable, **({"why_fixed": why} if why else {})}
    return Field(default, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """A closed, strict section of a configuration file: unknown keys name the known ones."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key{of} (known: {known})",
                        {"at": key, "of": cls._owner(data), "known": ", ".join(cls.model_fields)},
                    )
        return data

    @classmethod
    def _owner(cls, data: dict) -> str:
        """Whose keys these are, for the unknown-key error (`` for dataset 'x'``)."""
        return ""

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: dict, where: str = "") -> Self:
        """Validate ``values``; a problem is a ValueError whose one line starts with ``where``."""
        return validate(cls, values, where)

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.model_fields[name].default


def searchable_fields(model: type[BaseModel]) -> dict[str, bool]:
    """``{field: searchable}`` of a model built with ``param``."""
    return {name: bool((f.json_schema_extra or {}).get("searchable", False)) for name, f in model.model_fields.items()}


def why_fixed(model: type[BaseModel], name: str) -> str:
    return str((model.model_fields[name].json_schema_extra or {}).get("why_fixed", ""))


# ----------------------------------------------------------------------------- the LPT model
class LPTConfig(Section):
    """The shape of LPT (paper: L=10, P=20, K=2, S=6). ``group_start`` must also be below the
    backbone's depth, which only ``LPT`` knows."""

    prompt_length: int = param(10, ge=1, description="prompt tokens per block, shared and group prompts (L)")
    pool_size: int = param(20, ge=1, description="group prompts in the pool (P)")
    top_k: int = param(2, ge=1, description="group prompts chosen per image and averaged (K); at most pool_size")
    group_start: int = param(6, ge=1, description="first block that receives group prompts (S), below the depth")
    head_dropout: float = param(0.1, ge=0, lt=1, description="dropout before the cosine classifier while training")

    @model_validator(mode="after")
    def _top_k_in_pool(self) -> LPTConfig:
        if self.top_k > self.pool_size:
            raise PydanticCustomError(
                "top_k_pool",
                "must be in 1..pool_size={pool}, got {value}",
                {"at": "top_k", "pool": self.pool_size, "value": self.top_k},
            )
        return self


# ----------------------------------------------------------------------------- the recipe
RECIPE_CHOICE = "a recipe choice: set it in the profile (phase1.{key} / phase2.{key})"


class PhaseConfig(Section):
    """Recipe of one phase; the defaults are the released phase-2 script's. Phase 1 uses the same
    by default (A-GCL, dual sampling, a relatively large weight decay), as the LPT author states
    for phase 1 (released repository, issue #1); ``sampling: instance`` with ``gamma_pos`` =
    ``gamma_neg`` = 0 is the paper abstract's "conventional supervised prompt tuning" with GCL.
    ``batch_size`` is per branch."""

    epochs: int = param(
        90, ge=1, searchable=False, why="it sets the epoch count that early stopping (ASHA) compares trials at"
    )
    batch_size: int = param(256, ge=1, description="images per branch and step (dual: each of the two branches)")
    sampling: Literal["dual", "instance"] = param(
        "dual",
        searchable=False,
        why=RECIPE_CHOICE.format(key="sampling"),
        description="dual: a class-balanced and an instance-balanced branch per step, "
        "AGCL_cb + w(e) * AGCL_ib (the released code); instance: one shuffled branch, "
        "AGCL(gamma_pos, gamma_neg) alone (ib_gamma_* unused)",
    )
    lr: float = param(0.02, gt=0, description="learning rate per 256 images of one branch")
    momentum: float = param(0.9, ge=0)
    weight_decay: float = param(0.01, ge=0)
    warmup: Literal["epoch", "step"] = param(
        "epoch",
        searchable=False,
        why=RECIPE_CHOICE.format(key="warmup"),
        description="epoch: the lr changes once per epoch, as the released code steps timm's "
        "CosineLRScheduler (warm-up epochs at warmup_lr + e * (lr - warmup_lr) / "
        "warmup_epochs, then 0.5 * lr * (1 + cos(pi * e / epochs))); step: a linear "
        "warm-up per step over warmup_epochs, then a per-step cosine to 0",
    )
    warmup_epochs: int = param(1, ge=0)
    warmup_lr: float = param(1e-6, ge=0)
    per_class: int = param(4, ge=1, description="images per class draw of the class-aware sampler")
    margin: float = param(0.1, ge=0)
    scale: float = param(20.0, gt=0)
    noise_mul: float = param(0.5, ge=0)
    label_smoothing: float = param(0.1, ge=0, le=0.99)
    gamma_pos: float = param(
        0.0,
        ge=0,
        description="A-GCL focusing on the target, class-balanced branch "
        "(instance sampling: the only branch); 0/0 is plain GCL",
    )
    gamma_neg: float = param(
        4.0,
        ge=0,
        description="A-GCL focusing on the other classes, class-balanced "
        "branch (instance sampling: the only branch); 0/0 is plain GCL",
    )
    ib_gamma_pos: float = param(0.5, ge=0, description="instance-balanced branch of dual sampling")
    ib_gamma_neg: float = param(8.0, ge=0, description="instance-balanced branch of dual sampling")
    match_weight: float = param(0.5, ge=0, description="weight of the matching term (phase 2 only)")

    def describe(self, phase: int) -> str:
        """The recipe in one line, e.g. ``90 epochs, dual sampling, A-GCL (gamma_pos 0, gamma_neg 4;
        IB branch gamma_pos 0.5, gamma_neg 8, weight 0.5 -> 0), lr 0.02, wd 0.01, batch 256 per branch,
        warm-up 1 epoch (per epoch, from 1e-06)``."""
        g = lambda pos, neg: f"gamma_pos {pos:g}, gamma_neg {neg:g}"
        loss = "A-GCL" if self.gamma_pos or self.gamma_neg else "GCL"
        dual = self.sampling == "dual"
        focus = g(self.gamma_pos, self.gamma_neg)
        if dual:
            focus += f"; IB branch {g(self.ib_gamma_pos, self.ib_gamma_neg)}, weight 0.5 -> 0"
        match = f", match weight {self.match_weight:g}" if phase == 2 else ""
        warmup = (
            f", warm-up {self.warmup_epochs} epoch{'s' if self.warmup_epochs != 1 else ''} "
            f"(per {self.warmup}, from {self.warmup_lr:g})"
            if self.warmup_epochs
            else ", no warm-up"
        )
        return (
            f"{self.epochs} epochs, {self.sampling} sampling, {loss} ({focus}){match}, lr {self.lr:g}, "
            f"wd {self.weight_decay:g}, batch {self.batch_size}{' per branch' if dual else ''}{warmup}"
        )


# ----------------------------------------------------------------------------- errors
_PLAIN = {  # pydantic error type -> our wording (``{got}``: the value given; the rest: the error's ctx)
    "missing": "missing",
    "int_type": "must be an integer, got {got}",
    "int_parsing": "must be an integer, got {got}",
    "int_from_float": "must be an integer, got {got}",
    "float_type": "must be a number, got {got}",
    "float_parsing": "must be a number, got {got}",
    "finite_number": "must be a finite number, got {got}",
    "bool_type": "must be true or false, got {got}",
    "bool_parsing": "must be true or false, got {got}",
    "string_type": "must be a non-empty string, got {got}",
    "string_too_short": "must be a non-empty string, got {got}",
    "dict_type": "must be a mapping, got {got}",
    "model_type": "must be a mapping, got {got}",
    "model_attributes_type": "must be a mapping, got {got}",
    "list_type": "must be a list, got {got}",
    "too_short": "must have at least {min_length} items, got {got}",
    "too_long": "must have at most {max_length} items, got {got}",
    "greater_than_equal": "must be >= {ge}, got {got}",
    "greater_than": "must be > {gt}, got {got}",
    "less_than_equal": "must be <= {le}, got {got}",
    "less_than": "must be < {lt}, got {got}",
}
TAG_NOUNS = {"name": "dataset", "type": "type"}  # what the tag of a tagged union names


def _path(loc: tuple, data: Any) -> list[str]:
    """``loc`` as written in the file: list indices as ``[i]``, and without the tags pydantic adds
    for the member of a tagged union (a loc part that is not a key but a value at that level, such
    as ``synthetic`` of ``name: synthetic``)."""
    parts, node = [], data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list):
            parts.append(f"[{part}]")
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part not in node and part in [v for v in node.values() if isinstance(v, str)]:
            continue  # the tag of a tagged union's member (``data.name``, a parameter's ``type``)
        elif isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        else:
            parts.append(str(part))
            node = None
    return parts


def _join(parts: list[str]) -> str:
    return "".join(p if p.startswith("[") or not i else f".{p}" for i, p in enumerate(parts))


def _number(value: Any) -> Any:
    """A bound as written: 1 for 1.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def error_text(err: dict, data: Any, where: str = "") -> str:
    """One pydantic error as ``where.key.path: what was wrong``."""
    ctx, kind = err.get("ctx") or {}, err["type"]
    parts = _path(tuple(err["loc"]), data)
    if "at" in ctx:
        parts.append(str(ctx["at"]))
    got = repr(err.get("input"))
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        text = f"must be one of {', '.join(choices)}, got {got}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        parts.append(key)
        if kind == "union_tag_not_found" or not isinstance(err.get("input"), dict) or key not in err["input"]:
            text = "missing" if isinstance(err.get("input"), dict) else "must be a mapping"
        else:
            known = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            text = f"unknown {TAG_NOUNS.get(key, 'value')} {err['input'][key]!r} (known: {', '.join(known)})"
    elif kind in _PLAIN:
        text = _PLAIN[kind].format(got=got, **{k: _number(v) for k, v in ctx.items()})
    else:
        text = err["msg"].removeprefix("Value error, ")
    path = _join(([where] if where else []) + parts)
    return f"{path}: {text}" if path else text


def format_error(exc: ValidationError, data: Any, where: str = "") -> str:
    """The first error of ``exc`` in one line (see ``error_text``)."""
    return error_text(exc.errors(include_url=False)[0], data, where)


def validate(model: type[BaseModel] | TypeAdapter, data: Any, where: str = "") -> Any:
    """``model.model_validate(data)`` (or a TypeAdapter's ``validate_python``); a ValidationError
    becomes a ValueError of one line."""
    try:
        return model.validate_python(data) if isinstance(model, TypeAdapter) else model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_error(exc, data, where)) from None
