"""Two-phase training end to end on CPU; exact resume; metrics by shot group; the released
per-epoch lr schedule; instance sampling."""

import math

import pytest
import torch
from conftest import tiny_backbone

from lpt_core import LPT, PhaseConfig, Trainer, evaluate
from lpt_core.losses import AsymmetricGCL
from lpt_core.metrics import shot_accuracy
from lpt_core.sampling import DualBatchSampler, InstanceBatchSampler
from lpt_core.trainer import released_epoch_lr

RECIPE = PhaseConfig(epochs=3, batch_size=32, lr=0.5)


def make_model():
    return LPT(tiny_backbone(), 10, prompt_length=4, pool_size=6, top_k=2, group_start=2)


def test_two_phases_learn_well_above_chance(synthetic_data):
    model = make_model()
    seen = []
    p1 = Trainer(model, synthetic_data, 1, RECIPE, log=None).fit(lambda m, t: seen.append(m))
    p2 = Trainer(model, synthetic_data, 2, RECIPE, log=None).fit(lambda m, t: seen.append(m))
    assert [(m["phase"], m["epoch"]) for m in seen] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    for m in seen:
        assert {"train_loss", "images_per_s", "val_acc", "val_many_acc", "val_medium_acc", "val_few_acc"} <= set(m)
    test = evaluate(model, synthetic_data.test, synthetic_data.class_counts)
    assert test["acc"] > 45.0, test  # chance is 10%
    assert p2["val_acc"] > 45.0 and p1["val_acc"] > 30.0
    assert test["prompt_usage"].shape == (10, 6)
    assert int(test["prompt_usage"].sum()) == len(synthetic_data.test) * 2


@pytest.mark.parametrize("sampling", ["dual", "instance"])
def test_resume_after_epoch_k_equals_uninterrupted(tmp_path, sampling):
    from lpt_core.data import build_dataset

    synthetic_data = build_dataset(
        {"name": "synthetic", "num_classes": 10, "imbalance_ratio": 4, "max_per_class": 24, "image_size": 32, "seed": 1}
    )

    def run(stop_after=None):
        torch.manual_seed(0)
        model = make_model()
        Trainer(model, synthetic_data, 1, PhaseConfig(epochs=1, batch_size=16), log=None).fit()
        recipe = PhaseConfig(epochs=3, batch_size=16, lr=0.5, sampling=sampling)
        trainer = Trainer(model, synthetic_data, 2, recipe, seed=3, log=None)
        if stop_after is None:
            trainer.fit()
            return model.prompt_state_dict()

        class Stop(Exception):
            pass

        def on_epoch(metrics, t):
            t.save_state(tmp_path / "state.safetensors")
            if metrics["epoch"] == stop_after:
                raise Stop

        with pytest.raises(Stop):
            trainer.fit(on_epoch)
        torch.manual_seed(123)  # the resumed process starts from other RNG states
        fresh = make_model()
        fresh.load_prompt_state_dict({k: v.clone() for k, v in model.prompt_state_dict().items()})
        resumed = Trainer(fresh, synthetic_data, 2, recipe, seed=3, log=None)
        resumed.load_state(tmp_path / "state.safetensors")
        assert resumed.epoch == stop_after
        resumed.fit()
        return fresh.prompt_state_dict()

    full, resumed = run(), run(stop_after=1)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("phase", [1, 2])
def test_compiled_blocks_train_like_eager_without_graph_breaks(synthetic_data, phase):
    """aot_eager traces forward and backward as inductor would, without its C++ compile time;
    fullgraph=True turns any graph break into an error."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    recipe = PhaseConfig(epochs=2, batch_size=8)
    trainers = []
    for compile in (False, {"backend": "aot_eager", "fullgraph": True}):
        torch.manual_seed(0)
        trainers.append(Trainer(make_model(), synthetic_data, phase, recipe, compile=compile, log=None))
    eager, compiled = trainers
    assert compiled.model.blocks_compiled and not eager.model.blocks_compiled
    batches = iter(eager.loader)
    for step in range(3):
        images, labels = next(batches)
        losses = []
        for t in trainers:
            torch.manual_seed(step)  # the same head-dropout masks for both
            losses.append(t.train_step(images, labels, 0.5))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for name, value in eager.model.prompt_state_dict().items():
        torch.testing.assert_close(compiled.model.prompt_state_dict()[name], value, rtol=1e-4, atol=1e-5)
    # the 4 blocks share graphs: first block (its input needs no grad) and the rest; phase 2 adds
    # the no-grad trunk and query path. Not one graph per block.
    assert counters["stats"]["unique_graphs"] <= phase + 1


def test_nan_loss_is_an_error(synthetic_data):
    model = make_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="train_loss is nan"):
        Trainer(model, synthetic_data, 1, PhaseConfig(epochs=1, batch_size=64), log=None).fit()


def test_shot_accuracy_groups():
    counts = [150, 101, 100, 20, 19, 1]
    correct = torch.tensor([10, 5, 3, 2, 1, 0])
    total = torch.tensor([10, 10, 10, 10, 10, 10])
    acc = shot_accuracy(correct, total, counts)
    assert acc["acc"] == pytest.approx(100 * 21 / 60)
    assert acc["many_acc"] == pytest.approx(75.0)  # classes 0, 1
    assert acc["medium_acc"] == pytest.approx(25.0)  # classes 2, 3
    assert acc["few_acc"] == pytest.approx(5.0)  # classes 4, 5


def test_recipe_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"^phase2.gama_pos: unknown key \(known: epochs, "):
        PhaseConfig.from_dict({"gama_pos": 1.0}, where="phase2")


def test_epochs_yields_each_epoch_and_continues_where_the_caller_stopped(synthetic_data):
    trainer = Trainer(make_model(), synthetic_data, 1, PhaseConfig(epochs=3, batch_size=32), log=None)
    for metrics in trainer.epochs():
        assert trainer.epoch == metrics["epoch"] == 1 and trainer.history[-1] is metrics
        break
    assert [m["epoch"] for m in trainer.epochs()] == [2, 3] and trainer.epoch == 3
    assert list(trainer.epochs()) == [] and trainer.fit() == {}


def released_schedule(epochs: int, warmup_epochs: int, peak_lr: float, warmup_lr: float = 1e-6) -> list[float]:
    """The lr each epoch trains with in the released train_dual_dualloss.py: ``CosineLRScheduler(
    optimizer, warmup_lr_init=1e-6, t_initial=args.epochs, cycle_decay=0.1,
    warmup_t=args.warmup_epochs)`` on SGD at ``args.lr = base_lr * batch_size / 256``, and
    ``scheduler.step(epoch + 1)`` after each epoch."""
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak_lr)
    scheduler = CosineLRScheduler(
        optimizer, warmup_lr_init=warmup_lr, t_initial=epochs, cycle_decay=0.1, warmup_t=warmup_epochs
    )
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
    return lrs


@pytest.mark.parametrize(
    "epochs,warmup_epochs,lr,batch_size",
    [(90, 1, 0.02, 256), (4, 1, 0.5, 32), (7, 3, 0.1, 64), (3, 0, 0.5, 32), (2, 2, 0.5, 32)],
)
def test_epoch_warmup_is_the_released_schedule_to_the_bit(synthetic_data, epochs, warmup_epochs, lr, batch_size):
    cfg = PhaseConfig(epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, batch_size=batch_size)
    assert cfg.warmup == "epoch"
    released = released_schedule(epochs, warmup_epochs, lr * batch_size / 256)
    trainer = Trainer(make_model(), synthetic_data, 1, cfg, log=None)
    steps = trainer.steps_per_epoch
    for e in range(epochs):  # every step of an epoch trains at its epoch's lr
        assert trainer.lr_at(e * steps) == trainer.lr_at(e * steps + steps - 1) == released[e], e
    assert [released_epoch_lr(e, epochs, lr * batch_size / 256, warmup_epochs, 1e-6) for e in range(epochs)] == released
    if warmup_epochs:
        assert released[0] == 1e-6  # all of epoch 0 at warmup_lr


def test_step_warmup_is_linear_per_step_then_cosine(synthetic_data):
    cfg = PhaseConfig(epochs=4, warmup_epochs=1, lr=0.5, batch_size=32, warmup="step")
    trainer = Trainer(make_model(), synthetic_data, 1, cfg, log=None)
    steps, peak = trainer.steps_per_epoch, 0.5 * 32 / 256
    lrs = [trainer.lr_at(s) for s in range(4 * steps)]
    assert lrs[0] == 1e-6 and lrs[steps] == pytest.approx(peak)
    assert lrs[1] == pytest.approx(1e-6 + (peak - 1e-6) / steps)
    assert all(a < b for a, b in zip(lrs[:steps], lrs[1 : steps + 1]))
    assert all(a > b for a, b in zip(lrs[steps:], lrs[steps + 1 :]))
    assert lrs[steps + (3 * steps) // 2] == pytest.approx(
        0.5 * peak * (1 + math.cos(math.pi * ((3 * steps) // 2) / (3 * steps)))
    )


def test_reported_lr_is_the_lr_the_last_step_used(synthetic_data):
    for warmup in ("epoch", "step"):
        trainer = Trainer(
            make_model(), synthetic_data, 1, PhaseConfig(epochs=2, batch_size=32, lr=0.5, warmup=warmup), log=None
        )
        for metrics in trainer.epochs():
            assert metrics["lr"] == trainer.optimizer.param_groups[0]["lr"]
        assert trainer.history[0]["lr"] == (
            1e-6 if warmup == "epoch" else pytest.approx(trainer.lr_at(trainer.steps_per_epoch - 1))
        )


def test_instance_sampling_is_one_shuffled_branch(synthetic_data):
    logs = []
    recipe = PhaseConfig(
        epochs=1,
        batch_size=32,
        lr=0.5,
        sampling="instance",
        noise_mul=0.0,
        gamma_pos=1.5,
        gamma_neg=2.0,
        ib_gamma_pos=9.0,
        ib_gamma_neg=9.0,
    )
    model = make_model()
    trainer = Trainer(model, synthetic_data, 2, recipe, device="cpu", log=logs.append)  # fp32: exact
    assert isinstance(trainer.sampler, InstanceBatchSampler) and len(trainer.losses) == 1
    assert trainer.steps_per_epoch == len(synthetic_data.train) // 32  # one pass (dual: the released + 1)
    images, labels = next(iter(trainer.loader))
    assert images.shape[0] == 32
    # the step's loss: AGCL(gamma_pos, gamma_neg) - m * match over the whole batch, no branch weight
    model.train()
    torch.manual_seed(0)
    logits, aux = model(images)
    want = AsymmetricGCL(synthetic_data.class_counts, noise_mul=0.0, gamma_pos=1.5, gamma_neg=2.0)(logits, labels)
    want = want - 0.5 * aux["match_per_image"].mean()
    torch.manual_seed(0)
    torch.testing.assert_close(trainer.train_step(images, labels, 0.3), want.detach(), rtol=0, atol=0)
    trainer.fit()
    assert "steps of 32 images (instance sampling, lr set per epoch) on cpu" in logs[0]
    dual = Trainer(make_model(), synthetic_data, 1, PhaseConfig(epochs=1, batch_size=32), device="cpu", log=logs.append)
    assert isinstance(dual.sampler, DualBatchSampler) and len(dual.losses) == 2
    list(dual.epochs())
    assert "steps of 2x32 images (dual sampling, lr set per epoch) on cpu" in logs[-2]


def test_validation_shot_groups_follow_the_datas_shot_counts(synthetic_data):
    """iNat's groups come from the full train list (``info["shot_counts"]``), not from what its
    hold-out leaves: the trainer evaluates by ``data.shot_counts``; A-GCL keeps ``class_counts``."""
    synthetic_data.info["shot_counts"] = [500] * 10  # every class many-shot by the full list
    trainer = Trainer(make_model(), synthetic_data, 1, PhaseConfig(epochs=1, batch_size=32), device="cpu", log=None)
    assert trainer.shot_counts == [500] * 10 and trainer.class_counts == synthetic_data.class_counts
    metrics = next(trainer.epochs())
    assert metrics["val_many_acc"] == metrics["val_acc"] and math.isnan(metrics["val_few_acc"])


class SlowSplit(torch.utils.data.Dataset):
    """A split whose every image takes ``delay`` seconds to load, as a slow decoder would."""

    def __init__(self, split, delay: float):
        self.split, self.delay = split, delay

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        import time

        time.sleep(self.delay)
        return self.split[i]


def test_input_wait_fraction_is_the_share_of_the_epoch_spent_waiting_for_batches():
    import copy

    from lpt_core.data import build_dataset

    synthetic_data = build_dataset(
        {"name": "synthetic", "num_classes": 10, "imbalance_ratio": 4, "max_per_class": 24, "image_size": 32, "seed": 1}
    )
    recipe = PhaseConfig(epochs=1, batch_size=8, lr=0.5, sampling="instance")
    fed = Trainer(make_model(), synthetic_data, 1, recipe, log=None).fit()
    slow_data = copy.copy(synthetic_data)
    slow_data.train = SlowSplit(synthetic_data.train, delay=0.02)  # 8 x 20 ms per batch in the main process
    starved = Trainer(make_model(), slow_data, 1, recipe, log=None).fit()
    assert 0.0 <= fed["input_wait_fraction"] <= 1.0
    # the epoch's seconds from its rate; the loop waited at least the loader's sleeping, whatever
    # else the machine runs (sleeping does not slow down under load, computing does)
    steps = len(synthetic_data.train_labels) // 8
    seconds = steps * 8 / starved["images_per_s"]
    waited = starved["input_wait_fraction"] * seconds
    assert steps * 8 * 0.02 <= waited <= seconds, (waited, seconds)
    assert starved["images_per_s"] < 50.0  # 8 x 20 ms per batch


def test_data_bound_note_names_the_threshold_and_the_knobs():
    from tune.config.study import ProfileConfig
    from tune.trial import input_wait
    from tune.trial.table import TrialRow

    assert input_wait.trial_note(0.05) == ", input wait 5%"
    assert input_wait.trial_note(0.35) == (
        ", input wait 35% (data-bound, above 20%: more loader workers, cpu per trial, or gpu_decode/gpu_augment)"
    )
    assert input_wait.trial_note(float("nan")) == ""
    places = {"name": "places_lt", "root": "/d", "train_list": "t", "val_list": "v", "test_list": "s"}
    raw = {
        "data": {**places, "gpu_decode": False},
        "backbone": {"name": "vit_base_patch16_224"},
        "loader": {"num_workers": 2},
        "resources": {"cpu": 4, "gpu": 1},
    }
    profile = ProfileConfig.model_validate(raw)
    waited = lambda trial_id, w: TrialRow(trial_id=trial_id, status="completed", input_wait_fraction=w)  # noqa: E731
    rows = [waited(f"t{i}", w) for i, w in enumerate([0.3, 0.4, 0.1])]
    line, advice = input_wait.summary_lines(rows, profile)
    assert line.startswith("input wait: median 30% of the step time over 3 trials (worst 40%, trial t1")
    assert advice == (
        "  the search was data-bound: raise loader.num_workers (now 2) and resources.cpu per trial (now 4), "
        "or set data.gpu_decode: true"
    )
    on_device = ProfileConfig.model_validate({**raw, "data": {**places, "gpu_decode": True}})
    rows = [waited("a", 0.05), waited("b", 0.25)]
    assert input_wait.summary_lines(rows, on_device)[1].endswith("resources.cpu per trial (now 4)")
    assert input_wait.summary_lines([waited("a", 0.01)], profile) == [
        "input wait: median 1% of the step time over 1 trials (worst 1%, trial a; data-bound above 20%)"
    ]
