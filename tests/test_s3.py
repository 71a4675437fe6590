"""The graph with an s3:// base, against a real S3 HTTP endpoint (moto's server on loopback, as
s3fs's own tests use): partitions, quarantine, model references and the release all on S3."""

import socket
import subprocess
import sys
import time

import dagster as dg
import pyarrow.dataset as pads
import pytest
import yaml
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from kun_dagster.definitions import build_definitions

from .conftest import write_config

pytestmark = pytest.mark.slow
CORPUS = ["raw_corpus", "filtered_corpus", "labeled_pairs", "scored_pairs", "polished_pairs"]


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, models_run, tmp_path_factory, monkeypatch_module):
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "kun-test", "AWS_SECRET_ACCESS_KEY": "kun-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="kun")
    tmp = tmp_path_factory.mktemp("s3")
    refs = models_run["refs"]
    cfg_file = write_config(tmp, **{f"models.{r}.path": refs[f"{r}_model"]["path"] for r in ("base", "label", "chat")})
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["storage"] = {"base_uri": "s3://kun/data", "models_dir": str(tmp / "models"),
                      "storage_options": {"client_kwargs": {"endpoint_url": s3_endpoint}}}
    cfg_file.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets)
    tags = {ASSET_PARTITION_RANGE_START_TAG: "wudao|0", ASSET_PARTITION_RANGE_END_TAG: "wudao|1"}
    assert dg.materialize(assets, selection=["seed_data", "base_model", "label_model", "chat_model"],
                          resources=defs.resources, instance=instance).success
    assert dg.materialize(assets, selection=CORPUS, resources=defs.resources, instance=instance, tags=tags).success
    assert dg.materialize(assets, selection=["instruction_dataset"], resources=defs.resources, instance=instance,
                          partition_key="wudao").success
    import s3fs

    return {"fs": s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}), "instance": instance}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_stage_and_its_quarantine_land_on_s3_as_hive_partitions(s3_run):
    fs = s3_run["fs"]
    for asset in CORPUS:
        table = pads.dataset(f"kun/data/{asset}", filesystem=fs, partitioning="hive").to_table()
        assert set(table.column("source").to_pylist()) == {"wudao"}, asset
        assert set(table.column("shard").to_pylist()) == {0, 1}, asset
    raw = pads.dataset("kun/data/raw_corpus", filesystem=fs, partitioning="hive").to_table()
    quarantined = pads.dataset("kun/data/quarantine/raw_corpus", filesystem=fs, partitioning="hive").to_table()
    assert raw.num_rows == 51 and quarantined.column("reason").to_pylist() == ["empty_text"]  # wudao's planted row
    assert fs.exists("kun/data/models/refs/label_model.json") and fs.exists("kun/data/release/wudao/train.jsonl")
    final = pads.dataset("kun/data/instruction_dataset", filesystem=fs, partitioning="hive").to_table()
    polished = pads.dataset("kun/data/polished_pairs", filesystem=fs, partitioning="hive").to_table()
    assert final.num_rows == polished.num_rows == len(fs.cat("kun/data/release/wudao/train.jsonl").splitlines())


def test_no_secret_in_the_metadata(s3_run):
    records = s3_run["instance"].fetch_materializations(dg.AssetKey("labeled_pairs"), limit=10).records
    assert records
    for r in records:
        assert "kun-test-secret" not in str(r.asset_materialization.metadata)
