"""Two-phase training end to end on CPU; exact resume; metrics by shot group."""

import pytest
import torch

from conftest import tiny_backbone
from lpt_core import LPT, PhaseConfig, Trainer, evaluate
from lpt_core.metrics import shot_accuracy

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
        assert {"train_loss", "images_per_s", "val_acc", "val_many_acc", "val_medium_acc",
                "val_few_acc"} <= set(m)
    test = evaluate(model, synthetic_data.test, synthetic_data.class_counts)
    assert test["acc"] > 45.0, test   # chance is 10%
    assert p2["val_acc"] > 45.0 and p1["val_acc"] > 30.0
    assert test["prompt_usage"].shape == (10, 6)
    assert int(test["prompt_usage"].sum()) == len(synthetic_data.test) * 2


def test_resume_after_epoch_k_equals_uninterrupted(tmp_path):
    from lpt_core.data import build_dataset
    synthetic_data = build_dataset({"name": "synthetic", "num_classes": 10, "imbalance_ratio": 4,
                                    "max_per_class": 24, "image_size": 32, "seed": 1})

    def run(stop_after=None):
        torch.manual_seed(0)
        model = make_model()
        Trainer(model, synthetic_data, 1, PhaseConfig(epochs=1, batch_size=16), log=None).fit()
        recipe = PhaseConfig(epochs=3, batch_size=16, lr=0.5)
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
    assert acc["many_acc"] == pytest.approx(75.0)     # classes 0, 1
    assert acc["medium_acc"] == pytest.approx(25.0)   # classes 2, 3
    assert acc["few_acc"] == pytest.approx(5.0)       # classes 4, 5


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
