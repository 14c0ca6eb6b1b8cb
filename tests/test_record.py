"""The search record (tune/record.py): ``SearchRecord`` reads a search.json as an earlier version
wrote it and writes it back in the same format, and the engine's updates are the model's."""

import json
import shutil
from pathlib import Path

from tune.record import FINISHED, RUNNING, RunPart, SearchRecord, load_record, save_record

EARLIER = Path(__file__).parent / "data" / "search_v30.json"  # a finished search's record, before the model


def test_an_earlier_search_json_loads_and_saves_back_unchanged(tmp_path):
    shutil.copy(EARLIER, tmp_path / "search.json")
    record = load_record(tmp_path)
    assert record.state == FINISHED and record.runs == [RunPart(dir=".", trials=12, rows_before=[])]
    assert record.study_config.budget.trials == 12 and record.profile.resources.cpu == 1
    assert list(record.study_config.space.params()) == ["pool_size", "top_k", "group_start"]
    save_record(tmp_path, record)
    assert (tmp_path / "search.json").read_text() == EARLIER.read_text()  # keys, nesting, order, values


def test_a_key_added_since_is_read_at_its_default_and_not_written(tmp_path):
    raw = json.loads(EARLIER.read_text())
    for key in ("budget_ended", "phase1_task_s", "trial_estimate_s", "optuna_study"):
        del raw[key]
    assert "margin_se" not in raw["study_config"]["early_stopping"]  # added to the study since
    record = SearchRecord.model_validate(raw)
    assert (record.budget_ended, record.phase1_task_s, record.optuna_study) == (False, 0.0, "")
    assert record.study_config.early_stopping.margin_se == 1.0
    assert json.loads(json.dumps(record.to_dict())) == raw


def test_the_engine_updates_are_the_models(tmp_path):
    record = SearchRecord.model_validate(json.loads(EARLIER.read_text()))
    saved = record.model_copy(update={"state": RUNNING})  # the saved copy's state, not the record's
    record.runs.append(RunPart(dir="extend-1", trials=3, rows_before=["a", "b"]))
    record.study_config.budget.gpu_hours = 2.0
    save_record(tmp_path, saved)
    assert load_record(tmp_path).state == RUNNING and record.state == FINISHED
    save_record(tmp_path, record)
    out = json.loads((tmp_path / "search.json").read_text())
    assert out["runs"][-1] == {"dir": "extend-1", "trials": 3, "rows_before": ["a", "b"]}
    assert out["study_config"]["budget"]["gpu_hours"] == 2.0
