"""Load and check study and profile YAML files before anything starts, through typed models.

A study says what to search (``space``), what to optimise (``objective``), how many trials
(``budget``) and how to stop bad ones early (``early_stopping``). A profile says what to train on
(``data``, ``backbone``), the fixed recipe (``model``, ``phase1``, ``phase2``) and the per-trial
``resources``. ``StudyConfig`` and ``ProfileConfig`` hold every key with its default and range
(the model and recipe keys are ``lpt_core.config``'s ``LPTConfig`` and ``PhaseConfig``, the data
keys ``lpt_core.data.specs``'); ``schema("study"|"profile")`` is their JSON Schema. Every problem
is a ``ConfigError`` whose one-line message names the file and key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lpt_core.config import LPTConfig, PhaseConfig, Section
from lpt_core.data.specs import DataSpec
from lpt_core.data.transforms import InputOverrides
from lpt_core.metrics import SHOT_SPLITS
from tune.config.space import Space, _error

SHOT_KEYS = ("acc", "many_acc", "medium_acc", "few_acc")  # lpt_core.evaluate's accuracies, overall and by shot
OBJECTIVE_METRICS = tuple(f"val_{k}" for k in SHOT_KEYS)


# ----------------------------------------------------------------------------- profiles
class BackboneSpec(Section):
    """A timm model: ``name``, ``weights`` and any ``timm.create_model`` keyword (``img_size``,
    ``depth``, ``embed_dim``...) for a smaller ViT."""

    model_config = Section.model_config | {"extra": "allow"}
    name: str = Field(min_length=1, description="timm model name, e.g. vit_base_patch16_224.augreg_in21k")
    weights: str = Field("pretrained", min_length=1, description="pretrained, random, or a local weights file")

    def spec(self) -> dict[str, Any]:
        """The section as written (unset defaults left out): it keys the phase-1 cache, and
        ``lpt_core.backbones`` builds from it."""
        return self.model_dump(exclude_unset=True)


class Resources(Section):
    cpu: float = Field(1, gt=0, description="CPUs per trial")
    gpu: float = Field(0, ge=0, description="GPUs per trial: a fraction below 1 (trials share a GPU) or a whole number")

    @model_validator(mode="after")
    def _gpu_share(self) -> Resources:
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise _error(
                "gpu",
                "must be a fraction below 1 (trials share a GPU) or a whole number of GPUs, got {value}",
                value=self.gpu,
            )
        return self


class Loader(Section):
    num_workers: int = Field(4, ge=0)
    eval_batch_size: int = Field(256, ge=1)
    decode_per_core: float | None = Field(
        None,
        gt=0,
        description="img/s one CPU core decodes and augments for training, for --dry-run's input capacity "
        "(default: benchmarks/input_pipeline.py's figure, tune/config/input_capacity.py)",
    )


class ProfileConfig(Section):
    """What a study trains on and how: data, backbone, model shape, both phases' recipes, devices."""

    description: str | None = None
    data: DataSpec
    backbone: BackboneSpec
    model: LPTConfig = LPTConfig()
    phase1: PhaseConfig = PhaseConfig()
    phase2: PhaseConfig = PhaseConfig()
    input: InputOverrides | None = Field(
        None,
        description="override the input pipeline the backbone's "
        "pretrained config gives (mean, std, interpolation, crop_pct)",
    )
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    shot_split: Literal[SHOT_SPLITS] = "standard"
    images_per_s: float | None = Field(None, gt=0, description="training img/s of one trial, for --dry-run's GPU-hours")
    resources: Resources = Resources()
    loader: Loader = Loader()

    @model_validator(mode="after")
    def _cuda_needs_a_gpu(self) -> ProfileConfig:
        if self.device == "cuda" and self.resources.gpu == 0:
            raise PydanticCustomError(
                "config",
                "device cuda needs a GPU share per trial, got 0 (Ray would not give the trial a GPU)",
                {"at": "resources.gpu"},
            )
        return self

    def to_dict(self) -> dict:
        out = self.model_dump(exclude={"backbone"})
        out["backbone"] = self.backbone.spec()
        return out


# ----------------------------------------------------------------------------- studies
class Objective(Section):
    metric: Literal[OBJECTIVE_METRICS] = "val_acc"
    mode: Literal["max", "min"] = "max"
    metrics: list[Literal[OBJECTIVE_METRICS]] | None = Field(
        None, min_length=2, description="several objectives (Pareto front)"
    )
    modes: list[Literal["max", "min"]] | None = None

    @model_validator(mode="after")
    def _one_mode_per_metric(self) -> Objective:
        if self.metrics is not None and len(self.modes or []) != len(self.metrics):
            raise _error("modes", "must give one mode per metric")
        return self


class Budget(Section):
    trials: int = Field(12, ge=1)
    concurrency: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    gpu_hours: float | None = Field(
        None,
        gt=0,
        description="GPU-hours the search may spend (trials' wall time x resources.gpu, phase 1 up "
        "front included); no new trial starts past it (tune.config.budget)",
    )
    cpu_hours: float | None = Field(
        None, gt=0, description="the same in CPU-core-hours (wall time x resources.cpu), e.g. for CPU-only trials"
    )
    on_exhausted: Literal["finish", "stop"] = Field(
        "finish", description="once the hours are spent: let running trials finish, or stop them at their next epoch"
    )

    @model_validator(mode="after")
    def _one_measure(self) -> Budget:
        if self.gpu_hours is not None and self.cpu_hours is not None:
            raise _error("cpu_hours", "give gpu_hours or cpu_hours, not both")
        return self


GracePeriod = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, lt=1)] | Literal["auto"]


class EarlyStopping(Section):
    """ASHA on the first objective; its grace period resolves against the profile's phase 2
    (``tune.config.early_stopping``)."""

    enabled: bool = Field(True, description="stop bad trials early (ASHA); not with several objectives")
    grace_period: GracePeriod = Field(
        "auto",
        description="first rung: phase-2 epochs (an integer), a fraction of them (e.g. 0.1), or auto "
        "(at least a tenth of the schedule, peak_epochs after the longest warm-up the space samples, and "
        "with lr searched half the schedule)",
    )
    reduction_factor: float = Field(2, gt=1)
    peak_epochs: int = Field(2, ge=1, description="epochs at the peak learning rate before the first rung")
    min_trials: int = Field(
        3, ge=1, description="a rung stops a trial only when it holds at least this many other trials' results"
    )
    margin_se: float = Field(
        1.0,
        ge=0,
        description="a rung stops a trial only when it trails the cutoff by at least this many binomial "
        "standard errors of the validation accuracy",
    )

    @field_validator("grace_period", mode="wrap")
    @classmethod
    def _one_line(cls, value: Any, handler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "config",
                "must be a whole number of epochs >= 1, a fraction of the phase-2 epochs in (0, 1), or auto, got {got}",
                {"got": repr(value)},
            ) from None


SAMPLERS = ("tpe", "random", "gp", "cmaes")
TPE_ONLY = ("multivariate", "group", "constant_liar")


class Sampler(Section):
    """The Optuna sampler; unset keys are sized to the search (``tune.config.samplers``)."""

    type: Literal[SAMPLERS] = Field("tpe", description="tpe, random, gp (Gaussian process) or cmaes")
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        description="random trials before the model takes over (default: a third of the budget, "
        "at least 2, at most 10); not for random",
    )
    multivariate: bool | None = Field(None, description="tpe: sample parameters jointly (default: true)")
    group: bool | None = Field(
        None,
        description="tpe: multivariate per group of parameters that occur together "
        "(default: true where one parameter's range depends on another)",
    )
    constant_liar: bool | None = Field(
        None, description="tpe: treat running trials as bad so that concurrent trials spread out (default: true)"
    )

    @model_validator(mode="after")
    def _keys_of_its_type(self) -> Sampler:
        for key in TPE_ONLY:
            if getattr(self, key) is not None and self.type != "tpe":
                raise _error(key, "only for type tpe, not {type}", type=self.type)
        if self.n_startup_trials is not None and self.type == "random":
            raise _error("n_startup_trials", "not for type random (every trial is random)")
        if self.group and self.multivariate is False:
            raise _error("group", "needs multivariate: true")
        return self


class Baseline(Section):
    """A first trial with the profile's own values of every searched parameter: the reference
    the best trial's gain is measured against."""

    enabled: bool = Field(True, description="run the profile's own values as the search's first trial")
    exempt_from_early_stopping: bool = Field(True, description="the baseline always runs every epoch")


class StudyConfig(Section):
    """What to search, what to optimise, how many trials, how to stop bad ones early."""

    description: str | None = None
    objective: Objective = Objective()
    budget: Budget = Budget()
    early_stopping: EarlyStopping = EarlyStopping()
    seed: int = Field(0, ge=0, description="seed of the Optuna sampler")
    sampler: Sampler = Sampler()
    baseline: Baseline = Baseline()
    space: Space = Field(description="parameter: {type: int|float, low, high[, step, log]} or {type: choice, values}")

    @model_validator(mode="after")
    def _sampler_fits_the_objective(self) -> StudyConfig:
        if self.sampler.type == "cmaes" and self.objective.metrics is not None:
            raise _error(
                "sampler.type",
                "cmaes optimises one objective; this study has {n} (use tpe, gp or random)",
                n=len(self.objective.metrics),
            )
        if self.objective.metrics is not None and self.early_stopping.enabled:
            raise _error(
                "early_stopping.enabled",
                "ASHA ranks trials on one objective, and a trial it stopped "
                "would be off the Pareto front of this study's {n} only because its first one started "
                "slower: set enabled: false (every trial runs its epochs)",
                n=len(self.objective.metrics),
            )
        return self

    def to_dict(self) -> dict:
        """The study as search.json and the parent run hold it: the space as written, in the file's order."""
        out = self.model_dump(exclude_none=True, exclude={"space"})
        out["space"] = {k: spec.model_dump(exclude_unset=True) for k, spec in self.space.params().items()}
        return out


MODELS = {"study": StudyConfig, "profile": ProfileConfig}


def schema(kind: str) -> dict:
    """The JSON Schema of a study or a profile file."""
    out = MODELS[kind].model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"LPT {kind}", **out}
