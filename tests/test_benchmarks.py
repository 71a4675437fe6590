"""The benchmarks users compare (Kun reported C-Eval and CMMLU): lm-evaluation-harness tasks on the
tiny models, from a task in the harness's own format on local disk, with the hub off."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from kun_dagster import benchmarks, card
from kun_dagster.config import parse_config

HARNESS = Path(__file__).parent / "data" / "harness"

pytestmark = pytest.mark.slow


def local_task(tmp_path: Path) -> Path:
    """The C-Eval-shaped task, its data path made absolute (the harness reads it relative to the process)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(HARNESS / "kun_mc.jsonl", folder)
    spec = yaml.safe_load((HARNESS / "kun_mc.yaml").read_text(encoding="utf-8"))
    spec["dataset_kwargs"]["data_files"]["test"] = str(folder / "kun_mc.jsonl")
    (folder / "kun_mc.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return folder


def config(tasks, include_path) -> object:
    return parse_config(
        {
            "sources": [{"name": "web", "uri": "x", "format": "jsonl"}],
            "seed": {"uri": "s"},
            "evaluation": {"enabled": True, "benchmarks": {"tasks": tasks, "include_path": str(include_path), "batch_size": 4}},
        },
        env={},
    )


def test_a_local_task_runs_on_a_tiny_model_offline(models_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = config(["kun_mc"], local_task(tmp_path))
    got = benchmarks.run(models_run["refs"]["chat_model"]["path"], cfg)
    assert set(got) == {"kun_mc"}
    figures = got["kun_mc"]
    assert figures["n"] == 6 and figures["acc"] * 6 == pytest.approx(round(figures["acc"] * 6), abs=1e-3)  # a share of 6 questions
    assert 0 <= figures["acc"] <= 1 and figures["acc_stderr"] > 0 and 0 <= figures["acc_norm"] <= 1
    assert "HF_HUB_OFFLINE" not in os.environ  # the hub is off for the run, then as it was
    # a task that is neither the harness's nor under include_path: said, with its name
    with pytest.raises(benchmarks.BenchmarkError, match="no_such_task"):
        benchmarks.run(models_run["refs"]["chat_model"]["path"], config(["no_such_task"], tmp_path / "tasks"))


def test_the_card_shows_each_tasks_accuracy_before_and_after_the_release():
    report = {
        "heldout": 8,
        "models": [
            {"model": "seeds", "heldout_loss": 2.0, "benchmarks": {"ceval-valid": {"acc": 0.25, "acc_stderr": 0.05, "n": 1346}}},
            {
                "model": "seeds+web",
                "heldout_loss": 1.9,
                "win_rate": None,
                "verdict": "not judged: no evaluation.judge",
                "benchmarks": {"ceval-valid": {"acc": 0.3, "acc_stderr": 0.05, "n": 1346}},
            },
        ],
    }
    row = card.round_row(1, None, report, "web")
    assert row["benchmarks (seeds only -> + release)"] == "ceval-valid acc 0.250 -> 0.300 ± 0.050 (n=1346)"
    assert row["win rate vs seeds only [95% CI]"] == "not judged: no evaluation.judge"
