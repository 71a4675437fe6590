"""Alerts: every failed asset check, and every failed run, posted once to a Slack-compatible
webhook ($KUN_ALERT_WEBHOOK: a JSON body with `text`), with a link to the run in the UI
($KUN_UI_URL, default http://localhost:3000). With no webhook set, each alert is a log line.

The check sensor reads the instance's check executions (one row per check per run, in the index
storage every event log has; the event log itself is sharded by run on SQLite, where a query
across runs fails). Its cursor is a watermark: every execution below it has been seen, so each is
alerted once however often the sensor ticks; executions still running when a tick looks stay
above it until they resolve. The first tick starts at the newest execution (no flood of old
failures). Run failures use Dagster's own run-failure sensor cursor.
"""

import json
import os
import urllib.request

import dagster as dg

# no public name for a check execution's status, nor a public read of check executions: the
# instance's event log storage is what Dagster's own UI reads
from kun_dagster.dagster_private import AssetCheckExecutionRecordStatus as Status

WEBHOOK_ENV, UI_ENV = "KUN_ALERT_WEBHOOK", "KUN_UI_URL"


def run_url(run_id: str) -> str:
    return f"{os.environ.get(UI_ENV, 'http://localhost:3000').rstrip('/')}/runs/{run_id}"


def _redacted(text: str) -> str:
    """The alert without a credential: those of the config the code location runs ($KUN_CONFIG)
    and of the environment, and URI passwords."""
    from kun_dagster.config import load_config
    from kun_dagster.secrets import mask_uris, redact, secret_values

    try:
        return redact(text, secret_values(load_config(os.environ["KUN_CONFIG"])))
    except Exception:  # noqa: BLE001 - no config to read: still no URI password
        return mask_uris(text)


def post(text: str, log) -> bool:
    """Send one alert; False (and a log line) when no webhook is set or the post fails."""
    text = _redacted(text)
    url = os.environ.get(WEBHOOK_ENV)
    if not url:
        log.warning(f"alert (no ${WEBHOOK_ENV} set, so only logged): {text}")
        return False
    req = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).read()
        return True
    except OSError as e:  # the alert must not take the sensor down; the log keeps it
        log.error(f"alert could not be posted to ${WEBHOOK_ENV} ({type(e).__name__}: {e}): {text}")
        return False


def check_alert(evaluation, run_id: str) -> str:
    md = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
    figures = ", ".join(
        f"{k}: {json.dumps(md[k], ensure_ascii=False, default=str)}"
        for k in ("failures", "failing_partitions", "by_check", "values", "bound")
        if k in md
    )
    severity = evaluation.severity.value if evaluation.severity else "ERROR"
    return (
        f"[kun] {severity} check failed: {evaluation.asset_key.to_user_string()} / {evaluation.check_name}"
        f"{' (partition ' + evaluation.partition + ')' if evaluation.partition else ''}\n"
        f"{evaluation.description or ''}\n{figures}\nrun: {run_url(run_id)}"
    )


def _executions_since(instance, keys, watermark: int, page: int = 200) -> list:
    """Every check execution with an id at or above the watermark, for the given check keys."""
    out = []
    for key in keys:
        before = None
        while True:  # newest first, a page at a time, down to the watermark
            rows = instance.event_log_storage.get_asset_check_execution_history(key, limit=page, cursor=before)
            out += [r for r in rows if r.id >= watermark]
            if len(rows) < page or rows[-1].id < watermark:
                break
            before = rows[-1].id
    return sorted(out, key=lambda r: r.id)


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Posts each failed asset check once to ${WEBHOOK_ENV} (logs it when unset).",
)
def check_failure_alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    keys = sorted(context.repository_def.asset_graph.asset_check_keys, key=str)
    if context.cursor is None:  # first tick: from now on, not the instance's whole history
        latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
        context.update_cursor(json.dumps({"watermark": max((r.id for r in latest.values()), default=0) + 1, "done": []}))
        return dg.SkipReason("started: alerting check results from now on")
    state = json.loads(context.cursor)
    done, records = set(state["done"]), _executions_since(context.instance, keys, state["watermark"])
    runs: dict = {}

    def running(r) -> bool:  # planned, and its run still going: it may yet fail
        if r.status != Status.PLANNED:
            return False
        if r.run_id not in runs:
            run = context.instance.get_run_by_id(r.run_id)
            runs[r.run_id] = run is not None and not run.is_finished
        return runs[r.run_id]

    sent = 0
    for r in records:
        if r.status == Status.FAILED and r.id not in done:
            sent += post(check_alert(r.evaluation, r.run_id), context.log)
    pending = [r.id for r in records if running(r)]
    watermark = min(pending) if pending else max([r.id + 1 for r in records], default=state["watermark"])
    context.update_cursor(
        json.dumps({"watermark": watermark, "done": sorted(r.id for r in records if r.id >= watermark and not running(r))})
    )
    return dg.SkipReason(f"{len(records) - len(pending)} check evaluation(s) read, {sent} alert(s) posted")


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
    description=f"Posts each failed run once to ${WEBHOOK_ENV} (logs it when unset).",
)
def run_failure_alerts(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    error = context.failure_event.message or ""
    post(
        f"[kun] run failed: {run.job_name} {run.run_id[:8]} {run.tags.get('dagster/partition', '')}\n{error[:500]}\n"
        f"run: {run_url(run.run_id)}",
        context.log,
    )
