"""Alerts: every failed asset check, and every failed run, posted once to a Slack-compatible
webhook ($KUN_ALERT_WEBHOOK: a JSON body with `text`), with a link to the run in the UI
($KUN_UI_URL, default http://localhost:3000). With no webhook set, each alert is a log line.

The check sensor's cursor is the last event-log id it has seen, so a check is alerted once however
often the sensor ticks (its first tick starts at the end of the log: no flood of old failures);
run failures use Dagster's own run-failure sensor cursor.
"""

import json
import os
import urllib.request

import dagster as dg
from dagster._core.events import DagsterEventType

WEBHOOK_ENV, UI_ENV = "KUN_ALERT_WEBHOOK", "KUN_UI_URL"


def run_url(run_id: str) -> str:
    return f"{os.environ.get(UI_ENV, 'http://localhost:3000').rstrip('/')}/runs/{run_id}"


def post(text: str, log) -> bool:
    """Send one alert; False (and a log line) when no webhook is set or the post fails."""
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
    figures = ", ".join(f"{k}: {json.dumps(md[k], ensure_ascii=False, default=str)}" for k in
                        ("failures", "failing_partitions", "by_check", "values", "bound") if k in md)
    severity = evaluation.severity.value if evaluation.severity else "ERROR"
    return (f"[kun] {severity} check failed: {evaluation.asset_key.to_user_string()} / {evaluation.check_name}"
            f"{' (partition ' + evaluation.partition + ')' if evaluation.partition else ''}\n"
            f"{evaluation.description or ''}\n{figures}\nrun: {run_url(run_id)}")


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description=f"Posts each failed asset check once to ${WEBHOOK_ENV} (logs it when unset).")
def check_failure_alerts(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    if context.cursor is None:  # first tick: from now on, not the instance's whole history
        context.update_cursor(str(context.instance.event_log_storage.get_maximum_record_id() or 0))
        return dg.SkipReason("started: alerting check results from now on")
    cursor = int(context.cursor)
    records = context.instance.get_event_records(
        dg.EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION, after_cursor=cursor), ascending=True, limit=1000)
    sent = 0
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if not evaluation.passed:
            sent += post(check_alert(evaluation, record.event_log_entry.run_id), context.log)
        cursor = record.storage_id
    context.update_cursor(str(cursor))
    return dg.SkipReason(f"{len(records)} check evaluation(s) read, {sent} alert(s) posted")


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING, monitor_all_code_locations=False,
                       description=f"Posts each failed run once to ${WEBHOOK_ENV} (logs it when unset).")
def run_failure_alerts(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    error = context.failure_event.message or ""
    post(f"[kun] run failed: {run.job_name} {run.run_id[:8]} {run.tags.get('dagster/partition', '')}\n{error[:500]}\n"
         f"run: {run_url(run.run_id)}", context.log)
