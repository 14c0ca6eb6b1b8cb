"""The search space's models: a range of a parameter's own type and bounds, or a choice of its valid
values, for every searchable LPT and recipe parameter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, create_model, model_validator
from pydantic_core import PydanticCustomError

from lpt_core.config import LPTConfig, PhaseConfig, Section, searchable_fields, why_fixed

MODEL_KEYS = tuple(LPTConfig.model_fields)


RECIPE_KEYS = tuple(PhaseConfig.model_fields)


SEARCHABLE = {k: model for model in (LPTConfig, PhaseConfig) for k, ok in searchable_fields(model).items() if ok}


def _error(at: str, text: str, **ctx: Any) -> PydanticCustomError:
    """An error at sub-key ``at`` of the model that raises it (``lpt_core.config.error_text``)."""
    return PydanticCustomError("config", text, {"at": at, **ctx})


class _Range(Section):
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.low > self.high:
            raise _error("low", "must be <= high ({low} > {high})", low=self.low, high=self.high)
        if self.log and self.low <= 0:
            raise _error("low", "must be > 0 with log: true")
        return self


class _IntRange(_Range):
    if TYPE_CHECKING:  # each parameter's own bounds, added by ``_param_spec``
        low: int
        high: int

    type: Literal["int"]
    step: int | None = Field(None, ge=1)


class _FloatRange(_Range):
    if TYPE_CHECKING:
        low: float
        high: float

    type: Literal["float"]
    step: float | None = Field(None, gt=0)


class _Choice(Section):
    type: Literal["choice"]
    if TYPE_CHECKING:
        values: list[Any]


ParamSpec = _IntRange | _FloatRange | _Choice  # one parameter's range or choice


def _param_spec(name: str) -> Any:
    """The spec a study may give for searchable parameter ``name``: a range of its own type with
    its own bounds, or a choice of valid values."""
    field = SEARCHABLE[name].model_fields[name]
    value = Annotated[(field.annotation, *field.metadata)]
    is_int = field.annotation is int
    ranged = create_model(
        f"{name}_range", __base__=_IntRange if is_int else _FloatRange, low=(value, ...), high=(value, ...)
    )
    choice = create_model(f"{name}_choice", __base__=_Choice, values=(list[value], Field(min_length=1)))
    globals().update({ranged.__name__: ranged, choice.__name__: choice})  # found by name: a study pickles
    return Annotated[ranged | choice, Field(discriminator="type", description=field.description)]


class SpaceBase(Section):
    """The searched parameters; ``params()`` gives them in the study file's order."""

    _order: list[str] = PrivateAttr(default_factory=list)  # the file's order of the parameters

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        space = handler(data)
        if isinstance(data, dict):
            space._order = list(data)
        return space

    def params(self) -> dict[str, ParamSpec]:
        """``{name: spec}`` of every searched parameter, in the file's order."""
        names = self._order or [k for k in type(self).model_fields if getattr(self, k) is not None]
        return {k: getattr(self, k) for k in names}

    def spec(self, name: str) -> ParamSpec | None:
        """The spec of parameter ``name``; None when the study does not search it."""
        return getattr(self, name, None)

    def __contains__(self, name: str) -> bool:
        return self.spec(name) is not None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in RECIPE_KEYS or key in MODEL_KEYS:
                if key not in SEARCHABLE:
                    owner = LPTConfig if key in MODEL_KEYS else PhaseConfig
                    raise _error(key, "not searchable: {why}", why=why_fixed(owner, key))
            else:
                known = lambda model: ", ".join(k for k in SEARCHABLE if SEARCHABLE[k] is model)
                raise _error(
                    key,
                    "not a searchable parameter (model: {model}; recipe: {recipe})",
                    model=known(LPTConfig),
                    recipe=known(PhaseConfig),
                )
        if not data:
            raise PydanticCustomError("config", "empty; name at least one parameter to search")
        return data


Space = create_model("Space", __base__=SpaceBase, **{name: (_param_spec(name) | None, None) for name in SEARCHABLE})
