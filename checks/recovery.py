"""Runs whose worker died with nobody left to say so, and the pool slots they hold.

A run killed with its whole process group (SIGKILL, OOM, a preempted node, `kun run` interrupted
hard) stays STARTED for ever and keeps its `gpu` slot: every later GPU step then waits ("blocked by
limit for pool gpu"). Dagster notices a dead worker only through a launcher that can check its
health (k8s, docker, ECS) or through the code server that spawned it (`dagster dev`); a run the
CLI executes in its own process has neither. Here:

- `recover(instance)`: every STARTED run whose worker process is gone from this host is marked
  failed (run_retries may then retry it; LLM stages resume from their batch checkpoints), and the
  slots of every finished run are freed. `kun run` / `kun demo` call it when they start.
- the `dead_run_recovery` sensor does the same from the daemon, for a `dagster dev` whose code
  server died with its runs.

Which runs are "of this host": those the CLI tagged with its host and pid (`worker_tags`), and,
on a local instance (default run launcher, SQLite storage: every run worker is a process of this
machine), any run, its worker's pid read from its RUN_START event. Runs of other hosts are left to
their own host's CLI or daemon and to Dagster's run monitoring.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from kun_dagster.dagster_private import SqliteRunStorage  # it tells a one-machine instance

HOST_TAG, PID_TAG = "kun/host", "kun/pid"
ACTIVE = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def worker_tags() -> dict[str, str]:
    """Tags for a run executed in this process: where its worker is, so a later run can tell it died."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _started_at(pid: int) -> float | None:
    """When process `pid` started (epoch seconds); None when there is no such process; 0.0 when it
    exists but its start time cannot be read (not Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, as another user's
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def worker_alive(pid: int, since: float) -> bool:
    """Is the process that started a run at `since` still running as `pid`? A process with that pid
    that started later is another program that got the number."""
    started = _started_at(pid)
    return started is not None and started <= since + 1.0


def is_local(instance: dg.DagsterInstance) -> bool:
    """Every run worker of this instance runs on this machine: default launcher, SQLite storage."""
    return isinstance(instance.run_launcher, dg.DefaultRunLauncher) and isinstance(instance.run_storage, SqliteRunStorage)


def _worker(instance: dg.DagsterInstance, record, host: str, local: bool) -> tuple[int, float] | None:
    """(pid, start time) of a run's worker on this host, or None when it is not ours to judge."""
    tags = record.dagster_run.tags
    if HOST_TAG in tags:
        if tags[HOST_TAG] != host or not tags.get(PID_TAG, "").isdigit():
            return None
        return int(tags[PID_TAG]), record.create_timestamp.timestamp()
    if not local or record.dagster_run.status != dg.DagsterRunStatus.STARTED:
        return None  # a launch still starting is run monitoring's (start_timeout_seconds)
    started = instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_START)
    pid = started[-1].dagster_event.pid if started and started[-1].dagster_event else None
    return (pid, started[-1].timestamp) if pid else None


def recover(instance: dg.DagsterInstance, say: Callable[[str], None] = print) -> list[str]:
    """Fail the runs whose worker on this host is gone and free their slots; free the slots of
    every finished run. Returns the ids of the runs it failed (each said in one line)."""
    host, local, failed = socket.gethostname(), is_local(instance), []
    for record in instance.get_run_records(dg.RunsFilter(statuses=ACTIVE)):
        run = record.dagster_run
        worker = _worker(instance, record, host, local)
        if worker is None or worker_alive(*worker):
            continue
        now = instance.get_run_by_id(run.run_id)
        if now is None or now.status not in ACTIVE:  # finished meanwhile (its code server said so)
            continue
        message = (
            f"run {run.run_id[:8]} ({run.job_name}) was {run.status.value} but its worker (pid {worker[0]} on {host}) "
            "is gone: marked failed, its pool slots freed"
        )
        instance.report_run_failed(now, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(message)
        failed.append(run.run_id)
    _free_finished(instance, say)
    return failed


def _free_finished(instance: dg.DagsterInstance, say: Callable[[str], None]) -> None:
    """Slots still held by runs that have ended (failed or canceled by hand, killed and marked)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    holders = list(storage.get_concurrency_run_ids())
    if not holders:
        return
    for record in instance.get_run_records(dg.RunsFilter(run_ids=holders, statuses=FINISHED)):
        storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
        say(f"run {record.dagster_run.run_id[:8]} had ended ({record.dagster_run.status.value}) holding pool slots: freed")


@dg.sensor(
    name="dead_run_recovery",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails runs whose worker process is gone from this host (killed with its code server) and frees "
    "the pool slots of ended runs; run_retries then retries them and LLM stages resume.",
)
def dead_run_recovery(context: dg.SensorEvaluationContext):
    failed = recover(context.instance, context.log.warning)
    return dg.SkipReason(f"{len(failed)} dead run(s) failed" if failed else "no dead run")
