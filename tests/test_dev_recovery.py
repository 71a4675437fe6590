"""Crash recovery under `dagster dev`, end to end: a labeled_pairs run launched through the daemon has
its run worker SIGKILLed mid-partition; within a bounded time the run is failed, the `gpu` slot is
free, run_retries launches a retry, the retry reuses the finished batches, and the partition it
publishes equals an uninterrupted run's row for row, on both engines.

The instance is the repo's dagster.yaml with its monitoring intervals shortened (a test should not
wait 30 s per poll); everything else, the pool, the retries, the code server, is as users run it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from kun_dagster import storage
from kun_dagster.store import upath

from .conftest import CORPUS, MODELS, REPO, dagster_dev, free_port, given_models, wait_for, write_config
from .postgres import instance_yaml

pytestmark = pytest.mark.slow
KEY = "wudao|0"
PART = {"source": "wudao", "shard": "0"}
RUN = """
import json, sys, dagster as dg
from kun_dagster.definitions import build_definitions
defs = build_definitions(sys.argv[1])
for selection, key in json.loads(sys.argv[2]):
    assert dg.materialize(list(defs.assets), selection=selection, resources=defs.resources, partition_key=key).success
"""
HEAD = CORPUS[: CORPUS.index("deduped_corpus") + 1]  # ingest to dedupe: what labeled_pairs reads


def _in_subprocess(cfg: Path, *runs: tuple[list[str], str | None]) -> None:
    """Materializations, one after the other, in a fresh process (a vLLM engine pins its process's threads)."""
    argv = [sys.executable, "-c", RUN, str(cfg), json.dumps(runs)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


def _config(tmp: Path, models_run, backend: str) -> Path:
    tmp.mkdir(parents=True)
    overrides = {**given_models(models_run), "storage.checkpoint_rows": 1, "shards": 1}  # wudao|0: every wudao row
    overrides["models.base.backend"] = "transformers"  # the corpus head's perplexity: not what is killed here
    for role in ("label", "chat"):
        overrides[f"models.{role}.backend"] = backend
        overrides[f"models.{role}.vllm"] = {"enforce_eager": True, "kv_cache_gib": 0.25}
    return write_config(tmp, **overrides)


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (from /proc), children first."""
    try:
        kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
    except OSError:
        kids = []
    return [d for k in kids for d in _tree(k)] + [pid]


# (engine, what dies, the instance's storage): the whole run worker with its step process (a
# preempted node, the run's container OOM-killed) on PostgreSQL, as production runs it, or only the
# step process (the OOM killer's pick: the one holding the model) on SQLite.
CASES = [("transformers", "run worker", "postgres"), ("vllm", "step process", "sqlite")]


@pytest.mark.parametrize(
    "backend,killed,storage_url", CASES, ids=[f"{b}-{k.replace(' ', '-')}-{s}" for b, k, s in CASES], indirect=["storage_url"]
)
def test_a_killed_run_is_failed_freed_retried_and_resumed(backend, killed, storage_url, models_run, tmp_path):
    if backend == "vllm" and os.environ.get("KUN_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    cfg = _config(tmp_path / "killed", models_run, backend)
    clean_cfg = _config(tmp_path / "clean", models_run, backend)
    base, clean_base = upath(str(tmp_path / "killed" / "data")), upath(str(tmp_path / "clean" / "data"))
    _in_subprocess(cfg, (MODELS, None), (HEAD, KEY))  # one shard: all of wudao
    shutil.copytree(tmp_path / "killed" / "data", tmp_path / "clean" / "data")  # the same inputs for the run to compare with
    _in_subprocess(clean_cfg, (["labeled_pairs"], KEY))  # the uninterrupted run

    home = tmp_path / "home"
    instance_file = instance_yaml(home, storage_url)
    instance_cfg = yaml.safe_load(instance_file.read_text())
    instance_cfg["run_monitoring"].update(poll_interval_seconds=2, free_slots_after_run_end_seconds=2)  # test pace
    instance_file.write_text(yaml.safe_dump(instance_cfg))
    port, log = free_port(), tmp_path / "dagster-dev.log"
    with dagster_dev({"DAGSTER_HOME": str(home), "KUN_CONFIG": str(cfg)}, log, port):
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_id = client.submit_job_execution(
            "__ASSET_JOB",
            repository_location_name="kun",
            repository_name="__repository__",
            tags={"dagster/partition": KEY},
            asset_selection=["labeled_pairs"],
        )
        staging = storage.staging_dir(base, "labeled_pairs", PART)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            wait_for("two finished batch checkpoints", lambda: len(list(staging.glob("generate-*.parquet"))) >= 2, 300, log, every=0.05)
            worker = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)[-1].dagster_event.pid
            victims = _tree(worker) if killed == "run worker" else _tree(worker)[:-1]  # the step process (and what it started)
            assert victims
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)  # gone for sure: no batch lands after this count
            finished = len(list(staging.glob("generate-*.parquet")))
            t_kill = time.time()
            free = lambda: not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # noqa: E731

            if killed == "run worker":  # the run is failed, its slot freed, and run_retries starts a new run
                wait_for(
                    "the killed run marked failed",
                    lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE,
                    60,
                    log,
                    every=0.5,
                )
                wait_for("the gpu slot freed", free, 60, log, every=0.5)
                t_free = time.time() - t_kill

                def retried():
                    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
                    return runs[0] if runs and runs[0].is_finished else None

                done = wait_for("a retry of the killed run, finished", retried, 600, log, every=1)
            else:  # the step is retried in the same run (its retry policy), which then succeeds
                done = wait_for("the run finished", lambda: (r := instance.get_run_by_id(run_id)).is_finished and r, 600, log, every=1)
                retries = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
                assert len(retries) == 1, log.read_text()[-4000:]
                wait_for("the gpu slot freed", free, 60, log, every=0.5)
                t_free = time.time() - t_kill
            assert done.status == dg.DagsterRunStatus.SUCCESS, log.read_text()[-4000:]
            md = instance.fetch_materializations(dg.AssetKey("labeled_pairs"), limit=1).records[0].asset_materialization.metadata
            assert md["checkpoint_batches_reused"].value == finished > 0  # every batch finished before the kill
            assert md["checkpoint_batches_computed"].value > 0  # killed mid-partition
        print(
            f"{backend}, {killed} killed: run {done.run_id[:8]} succeeded {time.time() - t_kill:.0f} s after the kill "
            f"(slot free after {t_free:.0f} s), reusing {finished} batches"
        )
    for where in (storage.partition_dir, storage.quarantine_dir):  # row for row: doc ids and generations
        resumed, clean = (
            storage.read_partition(where(base, "labeled_pairs", PART)),
            storage.read_partition(where(clean_base, "labeled_pairs", PART)),
        )
        assert resumed.equals(clean), resumed.compare(clean) if resumed.shape == clean.shape else (resumed.shape, clean.shape)
    assert not storage.staging_dir(base, "labeled_pairs", PART).exists()
