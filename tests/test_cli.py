"""`kun validate` and `kun run` as a user meets them: every problem of a config named before a
long run (exit 2), a failing stage reported as what failed, without a traceback (exit 1)."""

import shutil

import pytest

from kun_dagster import cli

from .conftest import given_models, write_config


def test_validate_names_every_problem_before_a_run(tmp_path, capsys):
    given = tmp_path / "label"
    given.mkdir()
    (given / "config.json").write_text("{}")  # a config but no tokenizer
    cfg = write_config(tmp_path, **{"sources": [{"name": "web", "uri": str(tmp_path / "none-*.jsonl"), "format": "jsonl"}],
                                    "seed.uri": str(tmp_path / "seed.jsonl"), "models.label.path": str(given),
                                    "models.chat.path": str(tmp_path / "no-such-model")})
    assert cli.main(["validate", "--config", str(cfg)]) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert f"sources[0] (web): no file matches {tmp_path}/none-*.jsonl" in err
    assert f"seed.uri: no seed file at {tmp_path}/seed.jsonl" in err
    assert f"models.label.path: {given} holds no tokenizer" in err
    assert f"models.chat.path: {tmp_path}/no-such-model holds no config.json" in err
    assert cli.main(["run", "--config", str(cfg), "--progress", "off"]) == cli.BAD_INPUT  # run checks the same first
    assert "no file matches" in capsys.readouterr().err


def test_validate_passes_a_good_config_and_refuses_a_bad_one(tmp_path, capsys):
    assert cli.main(["validate", "--config", str(write_config(tmp_path))]) == cli.OK
    assert ": ok (3 sources x 2 shards" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{name: web, uri: x, format: csv}]\nseed: {uri: s}\n")
    assert cli.main(["validate", "--config", str(bad)]) == cli.BAD_INPUT
    assert "sources.0.format: Input should be" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(write_config(tmp_path)), "--source", "nope", "--progress", "off"]) == cli.BAD_INPUT
    assert "no source named nope; known: wudao, wanjuan, skypile" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failing_stage_is_reported_as_what_failed(models_run, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken-label"
    shutil.copytree(models_run["refs"]["label_model"]["path"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # passes the preflight, fails at load
    models = {**given_models(models_run), "models.label.path": str(broken)}
    cfg = write_config(tmp_path, shards=1, **models)
    monkeypatch.setenv("KUN_CONFIG", str(cfg))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["run", "--config", str(cfg), "--source", "wudao", "--progress", "off"]) == cli.FAILED
    out, err = capsys.readouterr()
    assert "kun: 1 corpus partition(s) (wudao) failed" in err and "step labeled_pairs failed:" in err and "could not load model broken-label" in err
    assert "Traceback" not in out + err and "(tracebacks: --debug)" in err and "Funnel" not in out
