"""The checks in a real run: a planted schema violation stops the run before the next stage,
publishes nothing, and is alerted exactly once to a webhook (a local HTTP receiver); passing
checks alert nothing; a failed run alerts too; with no webhook, a log line."""

import http.server
import json
import threading

import dagster as dg
import pytest

from kun_dagster import storage
from kun_dagster.config import load_config
from kun_dagster.definitions import build_definitions
from kun_dagster.llm.base import Generation

from .conftest import given_models, write_config
from .fakes import ScriptedEngine

pytestmark = pytest.mark.slow
KEY = "wudao|0"
PART = {"source": "wudao", "shard": "0"}


class Receiver(http.server.ThreadingHTTPServer):
    """A Slack-compatible webhook on loopback that keeps every JSON body it is sent."""

    def __init__(self):
        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"


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

    def run(selection, label_tokens=5):
        class Scripted(LLMResource):
            def engine(self, model):
                return LabelEngine(label_tokens)

        resources = {**defs.resources, "label_llm": Scripted(kun=defs.resources["kun"], role="label")}
        return dg.materialize(list(defs.assets), selection=selection, resources=resources, instance=instance,
                              partition_key=None if "seed_data" in selection else KEY, raise_on_error=False)

    assert run(["seed_data", "base_model", "label_model", "chat_model"]).success
    assert run(["raw_corpus", "filtered_corpus"]).success
    return {"run": run, "instance": instance, "base": storage.upath(load_config(cfg_file).base_uri)}


def _tick(instance, cursor=None) -> tuple[str, str]:
    """One sensor evaluation: (its new cursor, what it reported)."""
    from checks import check_failure_alerts

    ctx = dg.build_sensor_context(instance=instance, cursor=cursor)
    out = check_failure_alerts(ctx)
    return ctx.cursor, out.skip_message


def _evaluations(result):
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def test_passing_checks_publish_and_alert_nothing(graph, monkeypatch):
    hook = Receiver()
    monkeypatch.setenv("KUN_ALERT_WEBHOOK", hook.url)
    cursor, said = _tick(graph["instance"])  # the first tick starts at the end of the log
    assert said.startswith("started")
    result = graph["run"](["labeled_pairs"])
    assert result.success
    evals = _evaluations(result)
    assert {c for a, c in evals if a == "labeled_pairs"} == {"schema", "retention", "empty_output_rate"}
    assert all(e.passed for e in evals.values())
    assert evals[("labeled_pairs", "schema")].metadata["failures"].value == 0
    for a, c in (("raw_corpus", "schema"), ("filtered_corpus", "duplicate_rate")):  # from the fixture's run
        assert graph["instance"].event_log_storage.get_latest_asset_check_execution_by_key([dg.AssetCheckKey(dg.AssetKey(a), c)])
    _, said = _tick(graph["instance"], cursor)
    assert said == f"{len(evals)} check evaluation(s) read, 0 alert(s) posted" and hook.bodies == []
    hook.shutdown()


def test_a_planted_schema_violation_stops_the_run_publishes_nothing_and_alerts_once(graph, monkeypatch):
    from checks import run_failure_alerts

    hook = Receiver()
    monkeypatch.setenv("KUN_ALERT_WEBHOOK", hook.url)
    monkeypatch.setenv("KUN_UI_URL", "http://dagster.example:3000")
    labeled = storage.partition_dir(graph["base"], "labeled_pairs", PART)
    assert graph["run"](["labeled_pairs"]).success
    before = (labeled / "part-0.parquet").read_bytes()
    cursor, _ = _tick(graph["instance"])

    result = graph["run"](["labeled_pairs", "scored_pairs"], label_tokens=-1)  # an engine bug: negative token counts
    assert not result.success
    schema = _evaluations(result)[("labeled_pairs", "schema")]
    assert not schema.passed and schema.severity == dg.AssetCheckSeverity.ERROR
    n = schema.metadata["failures"].value
    assert n > 0 and schema.metadata["by_check"].value == {KEY: {"label_tokens: greater_than_or_equal_to(0)": n}}
    assert "-1" in schema.metadata["sample_failing_rows"].value
    assert (labeled / "part-0.parquet").read_bytes() == before  # nothing of it published
    assert not result.asset_materializations_for_node("labeled_pairs")
    scored_steps = [e for e in result.all_events if e.step_key == "scored_pairs"]
    assert not any(e.is_step_start for e in scored_steps)  # the next stage never ran

    cursor, _ = _tick(graph["instance"], cursor)
    assert len(hook.bodies) == 1
    text = hook.bodies[0]["text"]
    assert "ERROR check failed: labeled_pairs / schema" in text and KEY in text and str(n) in text
    assert f"http://dagster.example:3000/runs/{result.run_id}" in text
    _tick(graph["instance"], cursor)
    assert len(hook.bodies) == 1  # once, however often the sensor ticks

    run = graph["instance"].get_run_by_id(result.run_id)
    failure = graph["instance"].all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    ctx = dg.build_run_status_sensor_context(sensor_name="run_failure_alerts", dagster_event=failure,
                                             dagster_instance=graph["instance"], dagster_run=run).for_run_failure()
    run_failure_alerts(ctx)
    assert len(hook.bodies) == 2 and hook.bodies[1]["text"].startswith("[kun] run failed:") and result.run_id in hook.bodies[1]["text"]
    hook.shutdown()


def test_without_a_webhook_an_alert_is_a_log_line(monkeypatch, caplog):
    from checks.alerts import post

    monkeypatch.delenv("KUN_ALERT_WEBHOOK", raising=False)
    log = dg.get_dagster_logger("kun-test")
    assert post("[kun] something failed", log) is False
    assert "no $KUN_ALERT_WEBHOOK set, so only logged" in caplog.text and "[kun] something failed" in caplog.text
