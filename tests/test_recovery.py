"""Recovery from dead runs (checks/recovery.py, dagster.yaml's run_monitoring): a run killed with its
process stays STARTED and holds its `gpu` slot until someone notices; these tests kill real
processes mid-step and check that the next `kun run`, or the daemon's sensor, fails the dead run,
frees the slot, and lets the work finish."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest
import yaml

from checks.recovery import dead_run_recovery, is_local, recover

from .conftest import REPO
from .postgres import instance_yaml

# A step in the `gpu` pool that never ends on its own; `tagged` runs carry kun's worker tags (as the
# CLI's runs do), the others are known only by their RUN_START event's pid (as a daemon's runs).
HOLD_GPU = """
import sys, time, dagster as dg
from checks.recovery import worker_tags

@dg.asset(pool="gpu")
def holds_gpu():
    time.sleep(600)

with dg.DagsterInstance.get() as instance:
    dg.materialize([holds_gpu], instance=instance, tags=worker_tags() if sys.argv[1] == "tagged" else None)
"""


def test_the_repo_instance_monitors_runs_frees_slots_and_retries():
    cfg = yaml.safe_load((REPO / "dagster.yaml").read_text())
    mon = cfg["run_monitoring"]
    assert mon["enabled"] is True and mon["free_slots_after_run_end_seconds"] > 0
    assert {"poll_interval_seconds", "start_timeout_seconds", "cancel_timeout_seconds"} <= set(mon)
    assert cfg["run_retries"]["enabled"] is True and cfg["run_retries"]["max_retries"] >= 1
    assert cfg["concurrency"]["pools"]["default_limit"] == 1


@pytest.fixture
def instance(tmp_path, monkeypatch, storage_url):
    """An instance on the repo's dagster.yaml (gpu pool of 1), in a fresh DAGSTER_HOME, its
    storage SQLite (one machine) or PostgreSQL (shared: is_local is False)."""
    home = tmp_path / "home"
    instance_yaml(home, storage_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as inst:
        yield inst


# is_local: on SQLite every run worker is on this host, so an untagged run (the daemon's) is judged
# by its RUN_START pid; on PostgreSQL another host may run it: only kun's tagged runs are judged,
# the rest is run monitoring's.


def _hold_gpu(kind: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD_GPU, kind], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True
    )


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:  # with their whole process group: nothing is left to report them
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)


def _slots(instance) -> tuple[int, int]:
    """(slots claimed, steps queued for the pool, the claiming ones included)."""
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return len(info.claimed_slots), len(info.pending_steps)


def _wait(what, cond, seconds=120):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.2)


def test_killed_runs_are_failed_their_slots_freed_and_the_gpu_is_usable_again(instance, capsys):
    holder = _hold_gpu("tagged")
    _wait("the first run claims the gpu slot", lambda: _slots(instance)[0] == 1)
    waiter = _hold_gpu("untagged")
    _wait("the second run waits for the slot", lambda: _slots(instance) == (1, 2))
    _kill(holder, waiter)
    runs = instance.get_runs()
    assert [r.status for r in runs] == [dg.DagsterRunStatus.STARTED] * 2 and _slots(instance) == (1, 2)

    failed = recover(instance)  # what `kun run` does when it starts
    said = capsys.readouterr().out
    if not is_local(instance):  # shared instance: the untagged run is left to run monitoring, which fails it
        assert failed == [r.run_id for r in runs if r.tags.get("kun/pid")] and said.count("is gone") == 1
        assert _slots(instance) == (0, 1)  # the holder's slot is free; the dead waiter still queues
        instance.report_run_failed(next(r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED), "run monitoring")
        failed += recover(instance)
        said += capsys.readouterr().out
    assert sorted(failed) == sorted(r.run_id for r in runs if is_local(instance) or r.tags.get("kun/pid"))
    assert said.count("is gone: marked failed, its pool slots freed") == (2 if is_local(instance) else 1)
    assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.FAILURE}
    assert _slots(instance) == (0, 0)
    assert recover(instance) == []  # nothing left to do, nothing said twice
    assert capsys.readouterr().out == ""

    @dg.asset(pool="gpu")
    def quick():
        return 1

    assert dg.materialize([quick], instance=instance).success  # the gpu pool is free again


def test_the_daemon_sensor_fails_dead_runs_and_frees_the_slots_of_ended_ones(instance):
    first = _hold_gpu("untagged")
    _wait("the first run claims the gpu slot", lambda: _slots(instance)[0] == 1)
    _kill(first)
    instance.report_run_failed(instance.get_runs()[0], "marked failed by hand")  # as a user would: the slot stays taken
    second = _hold_gpu("untagged")
    _wait("the second run waits for the slot", lambda: _slots(instance) == (1, 2))
    _kill(second)
    result = dead_run_recovery(dg.build_sensor_context(instance=instance))
    if not is_local(instance):  # shared: the untagged dead run is run monitoring's; the ended run's slot is freed
        assert isinstance(result, dg.SkipReason) and result.skip_message == "no dead run"
        assert [r.status for r in instance.get_runs()] == [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.FAILURE]
        assert _slots(instance) == (0, 1)
        return
    assert isinstance(result, dg.SkipReason) and result.skip_message == "1 dead run(s) failed"
    assert [r.status for r in instance.get_runs()] == [dg.DagsterRunStatus.FAILURE] * 2 and _slots(instance) == (0, 0)


def test_a_live_run_is_left_alone(instance):
    proc = _hold_gpu("tagged")
    try:
        _wait("the run claims the gpu slot", lambda: _slots(instance)[0] == 1)
        assert recover(instance) == [] and instance.get_runs()[0].status == dg.DagsterRunStatus.STARTED
        assert _slots(instance) == (1, 1)
    finally:
        _kill(proc)


def test_a_pid_taken_by_a_later_process_is_not_the_worker():
    from checks.recovery import worker_alive

    assert worker_alive(os.getpid(), time.time())  # this process started before now: it can be a run's worker
    assert not worker_alive(os.getpid(), time.time() - 10 * 365 * 86400)  # a run begun before it started: the pid was reused
    assert not worker_alive(2**22 + 12345, time.time())  # no such process
