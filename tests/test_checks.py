"""The checks in a real run: a planted schema violation stops the run before the next stage,
publishes nothing, and is alerted exactly once to a webhook (a local HTTP receiver); passing
checks alert nothing; a failed run alerts too; with no webhook, a log line."""

import dagster as dg
import pytest

from kun_dagster import storage
from kun_dagster.config import load_config
from kun_dagster.definitions import build_definitions
from kun_dagster.llm.base import Generation
from kun_dagster.store import upath

from .conftest import MODELS, figures, given_models, write_config
from .fakes import Receiver, ScriptedEngine

pytestmark = pytest.mark.slow
KEY = "wudao|0"
PART = {"source": "wudao", "shard": "0"}


class LabelEngine(ScriptedEngine):
    """Answers every label prompt with one instruction; `tokens` is what it reports as the count."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens

    def generate(self, prompts, params):
        return [Generation("什么是复利？", self.tokens, "stop") for _ in prompts]


@pytest.fixture(scope="module")
def graph(models_run, tmp_path_factory):
    from resources import LLMResource

    tmp = tmp_path_factory.mktemp("checks")
    cfg_file = write_config(tmp, **given_models(models_run))
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()

    def run(selection, label_tokens=5, key=KEY):
        class Scripted(LLMResource):
            def engine(self, model):
                return LabelEngine(label_tokens)

        resources = {**defs.resources, "label_llm": Scripted(kun=defs.resources["kun"], role="label")}
        return dg.materialize(
            list(defs.assets),
            selection=selection,
            resources=resources,
            instance=instance,
            partition_key=None if "seed_data" in selection else key,
            raise_on_error=False,
        )

    assert run(MODELS).success
    source = KEY.split("|")[0]
    for shard in load_config(cfg_file).shard_keys():  # source-wide dedup reads every shard's signatures
        assert run(["raw_corpus", "filtered_corpus", "minhash_signatures"], key=f"{source}|{shard}").success
    assert run(["duplicate_clusters", "deduped_corpus"]).success
    return {"run": run, "instance": instance, "defs": defs, "base": upath(load_config(cfg_file).base_uri)}


def _tick(graph, cursor=None) -> tuple[str, str]:
    """One sensor evaluation: (its new cursor, what it reported)."""
    from checks import check_failure_alerts

    ctx = dg.build_sensor_context(instance=graph["instance"], cursor=cursor, definitions=graph["defs"])
    out = check_failure_alerts(ctx)
    return ctx.cursor, out.skip_message


def _evaluations(result):
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def test_passing_checks_publish_and_alert_nothing(graph, monkeypatch):
    hook = Receiver()
    monkeypatch.setenv("KUN_ALERT_WEBHOOK", hook.url)
    cursor, said = _tick(graph)  # the first tick starts at the end of the log
    assert said.startswith("started")
    result = graph["run"](["labeled_pairs"])
    assert result.success
    evals = _evaluations(result)
    assert {c for a, c in evals if a == "labeled_pairs"} == {"schema", "retention", "empty_output_rate"}
    assert all(e.passed for e in evals.values())
    assert evals[("labeled_pairs", "schema")].metadata["failures"].value == 0
    for a, c in (("raw_corpus", "schema"), ("filtered_corpus", "duplicate_rate")):  # from the fixture's run
        assert graph["instance"].event_log_storage.get_latest_asset_check_execution_by_key([dg.AssetCheckKey(dg.AssetKey(a), c)])
    _, said = _tick(graph, cursor)
    assert said == f"{len(evals)} check evaluation(s) read, 0 alert(s) posted" and hook.bodies == []
    hook.shutdown()


def test_a_planted_schema_violation_stops_the_run_publishes_nothing_and_alerts_once(graph, monkeypatch, capsys, tmp_path):
    from checks import run_failure_alerts

    hook = Receiver()
    monkeypatch.setenv("KUN_ALERT_WEBHOOK", hook.url)
    monkeypatch.setenv("KUN_UI_URL", "http://dagster.example:3000")
    labeled = storage.partition_dir(graph["base"], "labeled_pairs", PART)
    assert graph["run"](["labeled_pairs"]).success
    before = (labeled / "part-0.parquet").read_bytes()
    cursor, _ = _tick(graph)

    result = graph["run"](["labeled_pairs", "scored_pairs"], label_tokens=-1)  # an engine bug: negative token counts
    assert not result.success
    schema = _evaluations(result)[("labeled_pairs", "schema")]
    assert not schema.passed and schema.severity == dg.AssetCheckSeverity.ERROR
    n = schema.metadata["failures"].value
    assert n > 0 and schema.metadata["by_check"].value == {KEY: {"label_tokens: greater_than_or_equal_to(0)": n}}
    assert {r.data["label_tokens"] for r in schema.metadata["sample_failing_rows"].records} == {-1}  # tables in the UI
    assert figures(schema.metadata["failing_checks"]) == {KEY: "label_tokens: greater_than_or_equal_to(0)"}
    assert (labeled / "part-0.parquet").read_bytes() == before  # nothing of it published
    assert not result.asset_materializations_for_node("labeled_pairs")
    scored_steps = [e for e in result.all_events if e.step_key == "scored_pairs"]
    assert not any(e.is_step_start for e in scored_steps)  # the next stage never ran

    from kun_dagster import runner  # what `kun run` prints for it: the check, its counts, rows with file:row, no traceback

    capsys.readouterr()
    runner.report(result, None, graph["base"], tmp_path, debug=False)
    said = capsys.readouterr().err
    assert f"labeled_pairs: blocking check `schema` failed in {KEY}" in said
    assert f"{KEY}: label_tokens: greater_than_or_equal_to(0) x {n}" in said
    rows = [line for line in said.splitlines() if line.strip().startswith(("wudao_0", "wudao_1")) and "doc_id=" in line]
    assert 0 < len(rows) <= 5 and all(":" in r.split()[0] for r in rows)
    assert "quarantine:" in said and "(tracebacks: --debug)" in said and "Traceback" not in said

    cursor, _ = _tick(graph, cursor)
    assert len(hook.bodies) == 1
    text = hook.bodies[0]["text"]
    assert "ERROR check failed: labeled_pairs / schema" in text and KEY in text and str(n) in text
    assert f"http://dagster.example:3000/runs/{result.run_id}" in text
    _tick(graph, cursor)
    assert len(hook.bodies) == 1  # once, however often the sensor ticks

    run = graph["instance"].get_run_by_id(result.run_id)
    failure = graph["instance"].all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    ctx = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alerts", dagster_event=failure, dagster_instance=graph["instance"], dagster_run=run
    ).for_run_failure()
    run_failure_alerts(ctx)
    assert len(hook.bodies) == 2 and hook.bodies[1]["text"].startswith("[kun] run failed:") and result.run_id in hook.bodies[1]["text"]
    hook.shutdown()


def test_without_a_webhook_an_alert_is_a_log_line(monkeypatch, caplog):
    from checks.alerts import post

    monkeypatch.delenv("KUN_ALERT_WEBHOOK", raising=False)
    log = dg.get_dagster_logger("kun-test")
    assert post("[kun] something failed", log) is False
    assert "no $KUN_ALERT_WEBHOOK set, so only logged" in caplog.text and "[kun] something failed" in caplog.text


def test_a_check_still_running_below_a_finished_one_is_alerted_when_it_fails(tmp_path, monkeypatch):
    """Check executions get their ids when planned: a long run's check (low id) can fail after a
    later run's check (higher id) was alerted. Each is alerted once, in either order."""
    import time

    from dagster import AssetCheckEvaluation, DagsterEvent, EventLogEntry
    from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationPlanned  # test-only: no public name

    hook = Receiver()
    monkeypatch.setenv("KUN_ALERT_WEBHOOK", hook.url)
    graph = {"instance": dg.DagsterInstance.ephemeral(), "defs": build_definitions(write_config(tmp_path))}
    instance = graph["instance"]

    def run(status):
        r = dg.DagsterRun(job_name="__ASSET_JOB", status=status)
        instance.add_run(r)
        return r

    def event(run_id, kind, data):
        instance.event_log_storage.store_event(
            EventLogEntry(
                error_info=None,
                level="debug",
                user_message="",
                run_id=run_id,
                timestamp=time.time(),
                dagster_event=DagsterEvent(kind.value, "__ASSET_JOB", event_specific_data=data),
            )
        )

    def evaluate(run_id, asset, check, passed):
        event(
            run_id,
            dg.DagsterEventType.ASSET_CHECK_EVALUATION,
            AssetCheckEvaluation(
                asset_key=dg.AssetKey(asset),
                check_name=check,
                passed=passed,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{asset} {check}",
            ),
        )

    cursor, _ = _tick(graph)
    long_run, short_run = run(dg.DagsterRunStatus.STARTED), run(dg.DagsterRunStatus.SUCCESS)
    event(
        long_run.run_id,
        dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
        AssetCheckEvaluationPlanned(asset_key=dg.AssetKey("raw_corpus"), check_name="retention"),
    )
    event(
        short_run.run_id,
        dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
        AssetCheckEvaluationPlanned(asset_key=dg.AssetKey("filtered_corpus"), check_name="retention"),
    )
    evaluate(short_run.run_id, "filtered_corpus", "retention", passed=False)
    cursor, said = _tick(graph, cursor)
    assert [b["text"].splitlines()[0] for b in hook.bodies] == ["[kun] WARN check failed: filtered_corpus / retention"]
    assert said == "1 check evaluation(s) read, 1 alert(s) posted"  # the long run's check is still open

    evaluate(long_run.run_id, "raw_corpus", "retention", passed=False)
    instance.handle_run_event(long_run.run_id, DagsterEvent(dg.DagsterEventType.RUN_SUCCESS.value, "__ASSET_JOB"))
    cursor, _ = _tick(graph, cursor)
    cursor, _ = _tick(graph, cursor)
    assert [b["text"].splitlines()[0] for b in hook.bodies] == [
        "[kun] WARN check failed: filtered_corpus / retention",
        "[kun] WARN check failed: raw_corpus / retention",
    ]
    hook.shutdown()
