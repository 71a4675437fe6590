"""A materialization killed with SIGKILL mid-partition resumes at its last finished batch, and the
partition it publishes equals an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from kun_dagster import storage
from kun_dagster.config import load_config
from kun_dagster.definitions import build_definitions
from kun_dagster.store import upath

from .conftest import MODELS, REPO, given_models, write_config

pytestmark = pytest.mark.slow
KEY = "wudao|0"
PART = {"source": "wudao", "shard": "0"}
DEDUP = ["raw_corpus", "filtered_corpus", "minhash_signatures", "duplicate_clusters", "deduped_corpus"]
RUN_ONE = """
import sys, dagster as dg
from kun_dagster.definitions import build_definitions
defs = build_definitions(sys.argv[1])
dg.materialize(list(defs.assets), selection=["labeled_pairs"], resources=defs.resources, partition_key=sys.argv[2])
"""


def _setup(tmp, models_run):
    tmp.mkdir()
    cfg_file = write_config(tmp, **given_models(models_run), **{"storage.checkpoint_rows": 2})
    defs = build_definitions(cfg_file)
    assert dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources).success
    cfg = load_config(cfg_file)
    source = KEY.split("|")[0]
    for shard in cfg.shard_keys():  # source-wide dedup reads every shard's signatures
        key = f"{source}|{shard}"
        assert dg.materialize(list(defs.assets), selection=DEDUP[:3], resources=defs.resources, partition_key=key).success
    assert dg.materialize(list(defs.assets), selection=DEDUP[3:], resources=defs.resources, partition_key=KEY).success
    return cfg_file, defs, upath(cfg.base_uri)


def test_sigkill_mid_partition_then_rerun_resumes_and_equals_an_uninterrupted_run(tmp_path, models_run):
    cfg_file, defs, base = _setup(tmp_path / "killed", models_run)
    staging = storage.staging_dir(base, "labeled_pairs", PART)
    published = storage.partition_dir(base, "labeled_pairs", PART)

    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_ONE, str(cfg_file), KEY], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 180
    while len(list(staging.glob("generate-*.parquet"))) < 2:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no batch checkpoint within 180 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    finished = sorted(p.name for p in staging.glob("generate-*.parquet"))
    assert len(finished) >= 2
    assert not published.exists()  # nothing of the killed run is visible to readers

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(
        list(defs.assets), selection=["labeled_pairs"], resources=defs.resources, partition_key=KEY, instance=instance
    ).success
    md = instance.fetch_materializations(dg.AssetKey("labeled_pairs"), limit=1).records[0].asset_materialization.metadata
    deduped_rows = storage.partition_rows(storage.partition_dir(base, "deduped_corpus", PART))  # labeled_pairs' input
    batches = -(-deduped_rows // 2)
    assert md["checkpoint_batches_reused"].value == len(finished)  # every batch finished before the kill, and only those
    assert md["checkpoint_batches_computed"].value == batches - len(finished) > 0  # killed mid-partition
    assert not staging.exists()  # published: the checkpoints are gone

    _, clean_defs, clean_base = _setup(tmp_path / "clean", models_run)
    assert dg.materialize(list(clean_defs.assets), selection=["labeled_pairs"], resources=clean_defs.resources, partition_key=KEY).success
    for asset_dir in (
        lambda b: storage.partition_dir(b, "labeled_pairs", PART),
        lambda b: storage.quarantine_dir(b, "labeled_pairs", PART),
    ):
        resumed, clean = storage.read_partition(asset_dir(base)), storage.read_partition(asset_dir(clean_base))
        assert resumed.equals(clean)
    resumed = storage.read_partition(published)
    assert len(resumed) > 0 and resumed["doc_id"].is_unique
    assert len(resumed) + storage.partition_rows(storage.quarantine_dir(base, "labeled_pairs", PART)) == deduped_rows
