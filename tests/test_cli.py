"""`kun validate` and `kun run` as a user meets them: every problem of a config named before a
long run (exit 2), a failing stage reported as what failed, without a traceback (exit 1), a killed
run finished by the next, and a second run that makes only what is missing or stale."""

import os
import shutil

import pytest

from kun_dagster import cli
from kun_dagster.store import upath

from .conftest import CORPUS, MODELS, REPO, assert_fresh, given_models, kill_kun_run_when, write_config


def test_validate_names_every_problem_before_a_run(tmp_path, capsys):
    given = tmp_path / "label"
    given.mkdir()
    (given / "config.json").write_text("{}")  # a config but no tokenizer
    cfg = write_config(
        tmp_path,
        **{
            "sources": [{"name": "web", "uri": str(tmp_path / "none-*.jsonl"), "format": "jsonl"}],
            "seed.uri": str(tmp_path / "seed.jsonl"),
            "models.label.path": str(given),
            "models.chat.path": str(tmp_path / "no-such-model"),
        },
    )
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
    assert (
        "kun: 1 corpus partition(s) (wudao) failed" in err
        and "step labeled_pairs failed:" in err
        and "could not load model broken-label" in err
    )
    assert "Traceback" not in out + err and "(tracebacks: --debug)" in err and "Funnel" not in out


@pytest.mark.slow
def test_a_killed_kun_run_is_recovered_by_the_next(models_run, tmp_path, monkeypatch, capsys):

    import dagster as dg

    from kun_dagster import storage

    cfg = write_config(tmp_path, shards=1, **{**given_models(models_run), "storage.checkpoint_rows": 1})
    home = tmp_path / "home"
    staging = storage.staging_dir(upath(str(tmp_path / "data")), "labeled_pairs", {"source": "wudao", "shard": "0"})
    kill_kun_run_when(cfg, home, lambda: len(list(staging.glob("generate-*.parquet"))) >= 2, "labeled_pairs batch")
    finished = len(list(staging.glob("generate-*.parquet")))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        dead = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
        assert len(dead) == 1 and instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # it holds the gpu

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("KUN_CONFIG", str(cfg))
    assert cli.main(["run", "--config", str(cfg), "--source", "wudao", "--progress", "off"]) == cli.OK
    out = capsys.readouterr().out
    assert f"kun run: run {dead[0].run_id[:8]} (corpus_tail) was STARTED but its worker" in out  # the declared job it ran
    assert "is gone: marked failed, its pool slots freed" in out and "Funnel" in out
    # what the killed run had finished is not made again: only the step it was killed in
    assert "ingest, filter, sign: up to date" in out and "duplicate_clusters (wudao): up to date" in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(dead[0].run_id).status == dg.DagsterRunStatus.FAILURE
        md = instance.fetch_materializations(dg.AssetKey("labeled_pairs"), limit=1).records[0].asset_materialization.metadata
        assert md["checkpoint_batches_reused"].value == finished and md["checkpoint_batches_computed"].value > 0
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert_fresh(cfg, instance)  # what the killed run left half-done is re-made, and nothing is left stale


def test_validate_reaches_the_store_unless_offline(tmp_path, capsys):
    from .conftest import free_port

    port = free_port()  # nothing listens there
    cfg = write_config(
        tmp_path,
        **{
            "storage.base_uri": "s3://kun/data",
            "storage.s3": {"endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 1, "connect_timeout": 2},
        },
    )
    assert cli.main(["validate", "--config", str(cfg)]) == cli.BAD_INPUT
    assert f"storage.base_uri: cannot reach s3://kun/data at endpoint http://127.0.0.1:{port}" in capsys.readouterr().err
    assert cli.main(["validate", "--config", str(cfg), "--offline"]) == cli.OK


def test_validate_reads_the_first_records_and_names_a_misspelt_field(tmp_path, capsys):
    import json

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(
        "".join(json.dumps({"id": i, "content": "正文"}, ensure_ascii=False) + "\n" for i in range(3))
    )
    cfg = write_config(
        tmp_path, sources=[{"name": "web", "uri": str(tmp_path / "src" / "*.jsonl"), "format": "jsonl", "text_field": "text"}]
    )
    assert cli.main(["validate", "--config", str(cfg)]) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert "sources[0] (web): none of the first 3 records of a.jsonl is a document: missing_text (field 'text' is missing)" in err
    assert "keys seen: id, content" in err
    fixed = write_config(
        tmp_path, sources=[{"name": "web", "uri": str(tmp_path / "src" / "*.jsonl"), "format": "jsonl", "text_field": "content"}]
    )
    assert cli.main(["validate", "--config", str(fixed)]) == cli.OK


def _made(home) -> dict[str, int]:
    """How many partitions of each asset have been materialized in this DAGSTER_HOME, all runs."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        return {
            a: len(instance.fetch_materializations(dg.AssetKey(a), limit=10_000).records) for a in [*MODELS, *CORPUS, "instruction_dataset"]
        }


def _delta(before: dict, after: dict) -> dict[str, int]:
    return {a: after[a] - before[a] for a in after if after[a] != before[a]}


@pytest.mark.slow
def test_a_second_kun_run_makes_only_what_is_missing_or_stale(models_run, tmp_path, monkeypatch, capsys):
    import json

    import dagster as dg
    import yaml

    from kun_dagster.corpus import shard_of

    src = tmp_path / "wudao"
    shutil.copytree(REPO / "demo" / "corpora" / "wudao", src)
    wudao = {"name": "wudao", "uri": str(src / "*.json"), "format": "json", "text_field": "content", "id_field": "id"}
    # credentials planted where users put them: none may reach a card, a log or the Dagster instance
    planted = [f"PLANTED-{name}-7f3a9c" for name in ("token", "aws-secret", "hf-token", "env-key")]
    secrets = {
        "storage.storage_options": {"token": planted[0], "client_kwargs": {"aws_secret_access_key": planted[1]}},
        "models.chat.vllm.engine_kwargs": {"hf_token": planted[2]},
    }
    cfg = write_config(tmp_path, shards=2, sources=[wudao], **given_models(models_run), **secrets)
    monkeypatch.setenv("KUN__deploy__k8s__api_key", planted[3])
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("KUN_CONFIG", str(cfg))

    def kun_run() -> str:
        assert cli.main(["run", "--config", str(cfg), "--progress", "off"]) == cli.OK, capsys.readouterr().err
        return capsys.readouterr().out

    kun_run()
    first = _made(home)
    assert first["raw_corpus"] == 2 and first["polished_pairs"] == 2 and first["instruction_dataset"] == 1

    # nothing changed: the seeds and the given models are read again (seconds), nothing is made
    out = kun_run()
    again = _made(home)
    assert _delta(first, again) == {"seed_data": 1, "base_model": 1, "label_model": 1, "chat_model": 1}, out
    for step in ("ingest, filter, sign: up to date", "duplicate_clusters (wudao): up to date", "instruction_dataset (wudao): up to date"):
        assert step in out, out
    assert "Funnel (rows per stage)" in out

    # a new threshold: polish and the release again, never the scorer (its checkpoints are gone)
    doc = yaml.safe_load(cfg.read_text())
    doc.setdefault("score", {})["threshold"] = 0.9
    cfg.write_text(yaml.safe_dump(doc, allow_unicode=True))
    out = kun_run()
    changed = _made(home)
    assert _delta(again, changed) == {**_delta(first, again), "polished_pairs": 2, "instruction_dataset": 1}, out
    assert "[polished_pairs]" in out  # the tail's run names the one asset it makes

    # a new file in one shard: only that shard is ingested, filtered and signed; its source re-clustered
    name = next(f"wudao_new_{i}.json" for i in range(100) if shard_of(f"wudao_new_{i}.json", 2) == 1)
    texts = ["新到的一篇文章讲述了城市公园的四季景色，春天桃花盛开，夏天荷叶连天，秋天银杏金黄，冬天雪落松枝。" * 2]
    (src / name).write_text(json.dumps([{"id": "wd-new-0", "title": "公园", "content": texts[0]}], ensure_ascii=False), encoding="utf-8")
    out = kun_run()
    grown = _made(home)
    moved = _delta(changed, grown)
    assert {a: moved.get(a) for a in ("raw_corpus", "filtered_corpus", "minhash_signatures")} == dict.fromkeys(
        ("raw_corpus", "filtered_corpus", "minhash_signatures"), 1
    ), out
    assert moved.get("duplicate_clusters") == 2 and "source files: 1 partition(s) new or changed" in out
    assert "[1 of 2 partitions: wudao|1..wudao|1]" in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert_fresh(cfg, instance)

    # --force makes everything again
    assert cli.main(["run", "--config", str(cfg), "--progress", "off", "--force"]) == cli.OK
    out = capsys.readouterr()
    forced = _delta(grown, _made(home))
    assert forced["raw_corpus"] == 2 and forced["polished_pairs"] == 2 and forced["instruction_dataset"] == 1

    # no planted credential in any file under the data folder (cards, releases, quarantine) or
    # DAGSTER_HOME (the run and event log databases, compute logs), nor in what kun printed
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()] + [p for p in home.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.suffix == ".db" for p in files)
    leaks = [(str(p), t) for p in files for t in planted if t.encode() in p.read_bytes()]
    assert not leaks and not any(t in out.out + out.err for t in planted), leaks
    card = (tmp_path / "data" / "release" / "wudao" / "README.md").read_text(encoding="utf-8")
    assert "## Config used" in card and "score:" in card and "storage_options" not in card and "k8s" not in card


def test_demo_full_turns_on_the_rounds_and_the_evaluation_for_every_read_of_the_config(tmp_path, monkeypatch):
    """`kun demo` is Kun's single pass (kun.yaml); `--full` adds Humpback's second round and the
    evaluation through the environment, so the steps' own reads of the config see them too; a
    value the user set stays."""
    from kun_dagster.config import load_config

    seen = {}

    cfg = write_config(tmp_path, **{"iterations": 1, "evaluation": {"enabled": False}})

    def load(args):
        seen[args.full] = load_config(cfg)
        return None  # stop before running anything

    monkeypatch.setattr(cli, "_load", load)
    for var in cli.FULL_DEMO:
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["demo", "--progress", "off"]) == cli.BAD_INPUT
    assert seen[False].iterations == 1 and not seen[False].evaluation.enabled
    assert cli.main(["demo", "--full", "--progress", "off"]) == cli.BAD_INPUT
    assert seen[True].iterations == 2 and seen[True].evaluation.enabled
    assert not any(var in os.environ for var in cli.FULL_DEMO)  # the caller gets its environment back
    monkeypatch.setenv("KUN__iterations", "3")
    assert cli.main(["demo", "--full", "--progress", "off"]) == cli.BAD_INPUT
    assert seen[True].iterations == 3 and os.environ["KUN__iterations"] == "3"
    assert "KUN__evaluation" not in os.environ
    import yaml

    shipped = yaml.safe_load((REPO / "kun.yaml").read_text())
    assert shipped["iterations"] == 1 and shipped["evaluation"] in (False, "off")  # the demo's default: minutes, not ten
