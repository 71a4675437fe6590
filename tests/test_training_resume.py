"""A fine-tuning killed mid-way (SIGKILL) is resumed by the next one from its last complete Trainer
checkpoint, and ends with the weights an uninterrupted fine-tuning gives; through `kun run` too."""

import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from kun_dagster import training
from kun_dagster.config import TrainSettings

from .conftest import REPO, kill_when

pytestmark = pytest.mark.slow

SETTINGS = {"epochs": 3, "learning_rate": 2e-3, "batch_size": 2, "max_length": 256, "save_steps": 5}
# the fine-tuning, as a separate process that the test can kill
SCRIPT = """
import json, sys
from kun_dagster import training
from kun_dagster.config import TrainSettings
a = json.loads(sys.argv[1])
training.fine_tune(a["base"], a["out"], [tuple(e) for e in a["examples"]], TrainSettings(**a["settings"]), "label")
"""


def _weights(folder) -> dict:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_a_killed_fine_tuning_resumes_from_its_last_checkpoint(models_run, tmp_path):
    base = models_run["refs"]["base_model"]["path"]
    seeds, _ = training.load_seeds(str(REPO / "demo" / "seed" / "coig_cqia_seed.jsonl"), None, True)
    examples = training.chat_examples(seeds)[:80]  # 3 epochs of 40 steps
    out = tmp_path / "killed" / "label"
    args = json.dumps({"base": base, "out": str(out), "examples": examples, "settings": SETTINGS}, ensure_ascii=False)
    saved = []

    def checkpointed() -> bool:  # a checkpoint past step 20
        done = [training.last_checkpoint(d / "_trainer") for d in out.parent.glob(".label.train-*")]
        saved.append(max((int(c.name.rsplit("-", 1)[1]) for c in done if c), default=0))
        return saved[-1] >= 20

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    kill_when([sys.executable, "-c", SCRIPT, args], env, checkpointed, "checkpoint past step 20")
    saved = saved[-1]
    assert not out.exists()  # nothing published by the killed run

    resumed = training.fine_tune(base, out, examples, TrainSettings(**SETTINGS), "label")
    assert resumed.resumed_from_step >= saved and resumed.resumed_from_step < 120
    assert not list(out.parent.glob(".label.train-*"))  # the work folder became the model

    # the same fine-tuning, uninterrupted, in a folder of its own (its own work folder too)
    whole = training.fine_tune(base, tmp_path / "whole" / "label", examples, TrainSettings(**SETTINGS), "label")
    assert whole.resumed_from_step == 0
    a, b = _weights(out), _weights(tmp_path / "whole" / "label")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # the same steps on the same data: bit for bit
    assert resumed.loss_curve[-1] == whole.loss_curve[-1]


def test_save_steps_shape_no_code_version_and_no_cache_key():
    assert "save_steps" not in TrainSettings(save_steps=7).shaping()
    assert TrainSettings(save_steps=7).shaping() == TrainSettings(save_steps=0).shaping()


def test_a_killed_kun_run_resumes_the_fine_tuning_it_was_killed_in(tmp_path, monkeypatch, capsys):
    """The whole path: `kun run` trains the models (no given checkpoints) and is killed while the
    label model fine-tunes; the next `kun run` keeps the base it had finished and resumes the label
    model from its checkpoint."""
    import dagster as dg

    from kun_dagster import cli

    from .conftest import kill_kun_run_when, write_config

    # fewer epochs than the demo's: what is tested is the kill and the resume, not the models
    epochs = {"models.base.tiny.pretrain_epochs": 4, "models.chat.train.epochs": 4}
    cfg = write_config(tmp_path, shards=1, **{"models.label.train.save_steps": 5}, **epochs)
    home = tmp_path / "home"
    models = tmp_path / "data" / "models"
    checkpointed = lambda: any(training.last_checkpoint(d / "_trainer") for d in models.glob(".label.train-*"))  # noqa: E731
    kill_kun_run_when(cfg, home, checkpointed, "label-model checkpoint", timeout=600)

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("KUN_CONFIG", str(cfg))
    assert cli.main(["run", "--config", str(cfg), "--source", "wudao", "--progress", "off"]) == cli.OK
    out = capsys.readouterr().out
    assert "trained models [label_model" in out  # the base, finished before the kill, is not trained again
    with dg.DagsterInstance.from_config(str(home)) as instance:

        def made(asset):
            return instance.fetch_materializations(dg.AssetKey(asset), limit=10).records

        assert len(made("base_model")) == 1
        assert made("label_model")[0].asset_materialization.metadata["resumed_from_step"].value >= 5
    assert not list(models.glob(".label.train-*"))
