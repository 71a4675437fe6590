"""The graph with an s3:// base, against a real S3 HTTP endpoint (moto's server on loopback, as
s3fs's own tests use): partitions, quarantine, model references and the release on S3, a source
corpus read from S3; and the faults a long backfill meets: the endpoint down at start, restarted
mid-run, and wrong credentials."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pyarrow.dataset as pads
import pytest
import yaml

from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from kun_dagster.definitions import build_definitions

from . import share_nothing
from .conftest import CORPUS, MODELS, REPO, free_port, given_models, write_config
from .postgres import instance_yaml

pytestmark = pytest.mark.slow
SECRET = "kun-test-secret"
CREDS = {"AWS_ACCESS_KEY_ID": "kun-test", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_for_port(port: int, proc=None, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.time() > deadline or (proc is not None and proc.poll() is not None):
                pytest.fail(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.1)


class MotoServer:
    """moto's S3 (and IAM) server in a subprocess on a free loopback port."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, service: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRET,
        )

    def enforce_auth(self) -> None:
        """From now on every request must be signed by an IAM user's key (moto's switch)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class FlakyProxy:
    """A TCP proxy in front of the store that can go down (listener closed, open connections cut)
    and come back on the same port: from the client's side, an endpoint restart."""

    def __init__(self, upstream_port: int):
        self.upstream, self.port = upstream_port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.refused_while_down = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        # shutdown() before close(): a close() alone from this thread neither wakes the accept() and
        # recv() blocked on these sockets in other threads nor tells the client anything, so a
        # request in flight could wait on a connection nobody serves (seen once: a 20-minute hang)
        for sock in [self._listener, *self._conns_taken()]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _conns_taken(self) -> list[socket.socket]:
        with self._lock:
            conns, self._conns = self._conns, []
        return conns

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def moto(monkeypatch_module):
    for k, v in CREDS.items():
        monkeypatch_module.setenv(k, v)
    server = MotoServer()
    server.client("s3").create_bucket(Bucket="kun")
    yield server
    server.stop()


def _s3_config(tmp: Path, models_run, endpoint: str, base: str = "s3://kun/data", **overrides) -> Path:
    """The test config with models given by path, data under `base` through `endpoint`."""
    cfg_file = write_config(tmp, **given_models(models_run), **overrides)
    cfg = yaml.safe_load(cfg_file.read_text())
    s3 = {"endpoint_url": endpoint, "region": "us-east-1", "path_style": True, **cfg.get("storage", {}).get("s3", {})}
    cfg["storage"] = {**cfg["storage"], "base_uri": base, "models_dir": str(tmp / "models"), "s3": s3}
    cfg_file.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return cfg_file


def _upload_folder(s3, folder: Path, prefix: str) -> None:
    """Every file under `folder` to s3://kun/<prefix>/, at its relative path (a checkpoint given on S3)."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(f), "kun", f"{prefix}/{f.relative_to(folder).as_posix()}")


def _range(first: str, last: str) -> dict:
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


@pytest.fixture(scope="module")
def s3_run(moto, models_run, tmp_path_factory):
    s3 = moto.client("s3")
    for f in sorted((REPO / "demo/corpora/wudao").glob("*.json")):  # the wudao source is read from S3
        s3.upload_file(str(f), "kun", f"corpora/wudao/{f.name}")
    label_dir = Path(models_run["refs"]["label_model"]["path"])
    _upload_folder(s3, label_dir, "given/label")  # the label model is given on S3
    tmp = tmp_path_factory.mktemp("s3")
    cfg_file = _s3_config(tmp, models_run, moto.url)
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["sources"][0]["uri"] = "s3://kun/corpora/wudao/*.json"
    cfg["models"]["label"]["path"] = "s3://kun/given/label"
    cfg["storage"]["model_cache"] = str(tmp / "cache")
    cfg_file.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    assets = list(defs.assets)
    assert dg.materialize(assets, selection=MODELS, resources=defs.resources, instance=instance).success
    assert dg.materialize(assets, selection=CORPUS, resources=defs.resources, instance=instance, tags=_range("wudao|0", "wudao|1")).success
    assert dg.materialize(
        assets, selection=["instruction_dataset", "dataset_card"], resources=defs.resources, instance=instance, partition_key="wudao"
    ).success
    import s3fs

    return {
        "fs": s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url}),
        "instance": instance,
        "defs": defs,
        "tmp": tmp,
        "label_dir": label_dir,
    }


def test_every_stage_and_its_quarantine_land_on_s3_as_hive_partitions(s3_run):
    fs = s3_run["fs"]
    for asset in CORPUS:
        table = pads.dataset(f"kun/data/{asset}", filesystem=fs, partitioning="hive").to_table()
        assert set(table.column("source").to_pylist()) == {"wudao"}, asset
        assert table.num_rows and set(table.column("shard").to_pylist()) <= {0, 1}, asset
        # every partition is published, an empty one (no rows kept) too
        assert all(fs.exists(f"kun/data/{asset}/source=wudao/shard={k}/part-0.parquet") for k in (0, 1)), asset
    raw = pads.dataset("kun/data/raw_corpus", filesystem=fs, partitioning="hive").to_table()
    quarantined = pads.dataset("kun/data/quarantine/raw_corpus", filesystem=fs, partitioning="hive").to_table()
    assert raw.num_rows == 52 and quarantined.column("reason").to_pylist() == ["empty_text"]  # wudao's planted row
    assert set(raw.column("file").to_pylist()) == {"wudao_00.json", "wudao_01.json"}  # read from s3://kun/corpora/wudao/
    assert fs.exists("kun/data/models/refs/label_model.json") and fs.exists("kun/data/release/wudao/train.jsonl")
    final = pads.dataset("kun/data/instruction_dataset", filesystem=fs, partitioning="hive").to_table()
    polished = pads.dataset("kun/data/polished_pairs", filesystem=fs, partitioning="hive").to_table()
    assert final.num_rows == polished.num_rows == len(fs.cat("kun/data/release/wudao/train.jsonl").splitlines())
    assert not fs.exists("kun/data/_staging/labeled_pairs/source=wudao/shard=0")  # checkpoints go once published


def test_a_model_on_s3_is_cached_locally_for_the_engine(s3_run):
    instance = s3_run["instance"]
    ref = instance.get_latest_materialization_event(dg.AssetKey("label_model")).asset_materialization
    assert ref is not None
    cached = list((s3_run["tmp"] / "cache").glob("label-*"))
    assert len(cached) == 1 and (cached[0] / "config.json").read_bytes() == (s3_run["label_dir"] / "config.json").read_bytes()
    assert (cached[0] / "model.safetensors").stat().st_size == (s3_run["label_dir"] / "model.safetensors").stat().st_size
    md = instance.fetch_materializations(dg.AssetKey("labeled_pairs"), limit=1).records[0].asset_materialization.metadata
    assert md["engine"].value == "transformers: label"  # the given model, by its S3 folder's name


def test_credentials_come_from_the_environment_by_name_and_never_appear(s3_run):
    kun = s3_run["defs"].resources["kun"]
    assert isinstance(kun.s3_secret_access_key, dg.EnvVar) and kun.s3_secret_access_key.env_var_name == "AWS_SECRET_ACCESS_KEY"
    instance = s3_run["instance"]
    assert instance.get_runs()
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            assert SECRET not in str(entry), entry.dagster_event_type


def test_a_new_object_is_seen_by_the_next_listing_in_the_same_process(moto):
    """The sensor lists every source each tick in one long-lived process: s3fs keeps a listing of
    each folder it walked (its dircache, no expiry), so without a fresh listing a new file under an
    already-walked folder was never seen."""
    from kun_dagster import corpus
    from kun_dagster.config import SourceConfig

    s3 = moto.client("s3")
    s3.put_object(Bucket="kun", Key="fresh/corpus/a/f0.jsonl", Body=b'{"text": "x"}')
    source = SourceConfig(name="web", uri="s3://kun/fresh/corpus/*/*.jsonl", format="jsonl")
    options = {"client_kwargs": {"endpoint_url": moto.url}}
    before = corpus.shard_versions(source, source.uri, 4, options)
    s3.put_object(Bucket="kun", Key="fresh/corpus/a/f1.jsonl", Body=b'{"text": "y"}')
    after = corpus.shard_versions(source, source.uri, 4, options)
    assert {k for k in before if before[k] != after[k]} == {corpus.shard_of("a/f1.jsonl", 4)}
    assert len(corpus.listing(source, source.uri, options).found) == 2


@pytest.mark.parametrize("kind", ["CSV", "Parquet"])
def test_a_source_listed_from_its_s3_inventory_reads_what_listing_the_bucket_reads(moto, kind):
    """An S3 Inventory report (manifest.json and its data files, as AWS writes them: CSV gzipped
    without a header and keys URL-encoded, or Parquet in snake_case) stands for the bucket's listing:
    the same files, sizes and ETags, so the same shard versions and documents; delete markers,
    older versions and keys outside the glob are left out. No LIST request is made for the source."""
    import gzip
    import io
    import urllib.parse

    import pandas as pd

    from kun_dagster import corpus
    from kun_dagster.config import SourceConfig

    s3 = moto.client("s3")
    prefix = f"inventory-{kind.lower()}"
    names = [f"corpus/{d}/f{i}.jsonl" for d in ("a", "b") for i in range(5)] + ["corpus/a/文 件+1.jsonl", "corpus/b/readme.txt"]
    for n in names:
        s3.put_object(
            Bucket="kun", Key=f"{prefix}/{n}", Body=json.dumps({"id": n, "text": f"{n} 的正文。" * 10}, ensure_ascii=False).encode()
        )
    objects = s3.list_objects_v2(Bucket="kun", Prefix=f"{prefix}/")["Contents"]
    rows = [
        {
            "Bucket": "kun",
            "Key": o["Key"],
            "Size": o["Size"],
            "LastModifiedDate": o["LastModified"].isoformat(),
            "ETag": o["ETag"].strip('"'),
            "IsLatest": "true",
            "IsDeleteMarker": "false",
        }
        for o in objects
    ]
    rows += [
        {
            "Bucket": "kun",
            "Key": f"{prefix}/corpus/a/gone.jsonl",
            "Size": None,
            "LastModifiedDate": None,
            "ETag": None,
            "IsLatest": "true",
            "IsDeleteMarker": "true",
        },
        {
            "Bucket": "kun",
            "Key": f"{prefix}/corpus/a/f0.jsonl",
            "Size": 1,
            "LastModifiedDate": None,
            "ETag": "old",
            "IsLatest": "false",
            "IsDeleteMarker": "false",
        },
    ]
    schema = list(rows[0])
    frame = pd.DataFrame(rows, columns=schema)
    if kind == "CSV":
        encoded = frame.assign(Key=frame["Key"].map(urllib.parse.quote_plus))
        body, data_key = gzip.compress(encoded.to_csv(header=False, index=False).encode()), f"reports/{prefix}/data/part-0.csv.gz"
    else:
        buffer = io.BytesIO()
        frame.rename(columns=lambda c: corpus.manifests._snake(c)).to_parquet(buffer)
        body, data_key = buffer.getvalue(), f"reports/{prefix}/data/part-0.parquet"
    s3.put_object(Bucket="kun", Key=data_key, Body=body)
    manifest = {
        "sourceBucket": "kun",
        "destinationBucket": "arn:aws:s3:::kun",
        "fileFormat": kind,
        "fileSchema": ", ".join(schema),
        "files": [{"key": data_key}],
    }
    s3.put_object(Bucket="kun", Key=f"reports/{prefix}/manifest.json", Body=json.dumps(manifest).encode())

    source = SourceConfig(name="web", uri=f"s3://kun/{prefix}/corpus/*/*.jsonl", format="jsonl", id_field="id")
    options, inventory = {"client_kwargs": {"endpoint_url": moto.url}}, f"s3://kun/reports/{prefix}/manifest.json"
    listed = corpus.listing(source, source.uri, options)
    from_inventory = corpus.listing(source, source.uri, options, inventory)
    assert len(listed.found) == 11 and sorted(from_inventory.found) == sorted(listed.found)
    assert all(
        (from_inventory.found[p]["size"], from_inventory.found[p]["ETag"]) == (i["size"], i["ETag"]) for p, i in listed.found.items()
    )
    assert corpus.shard_versions(source, source.uri, 3, options, manifest=inventory) == corpus.shard_versions(
        source, source.uri, 3, options
    )
    docs = [
        sorted(
            d for shard in range(3) for b in corpus.iter_shard(source, source.uri, shard, 3, options, listed=lst) for d in b.docs["doc_id"]
        )
        for lst in (listed, from_inventory)
    ]
    assert docs[0] == docs[1] and len(docs[0]) == 11


def test_endpoint_unreachable_at_start_fails_naming_the_endpoint(models_run, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg_file = _s3_config(tmp_path, models_run, dead, **{"storage.s3": {"max_attempts": 2, "connect_timeout": 1}})
    defs = build_definitions(cfg_file)
    result = dg.materialize(list(defs.assets), selection=["seed_data"], resources=defs.resources, raise_on_error=False)
    assert not result.success
    error = str([e.event_specific_data.error for e in result.all_events if e.is_failure])
    assert f"cannot reach s3://kun/data at endpoint {dead} after 2 attempts" in error
    assert "storage.s3.endpoint_url" in error


def test_endpoint_restarted_mid_run_is_retried_and_the_run_succeeds(moto, models_run, tmp_path):
    proxy = FlakyProxy(moto.port)
    # its own prefix: s3_run's data under kun/data is the single-process run the share-nothing test compares with
    cfg_file = _s3_config(tmp_path, models_run, proxy.url, base="s3://kun/restart", **{"storage.checkpoint_rows": 2})
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance).success
    upstream = CORPUS[: CORPUS.index("deduped_corpus") + 1]  # the labeled stage's input, before the outage
    tags = _range("wudao|0", "wudao|1")
    assert dg.materialize(list(defs.assets), selection=upstream, resources=defs.resources, instance=instance, tags=tags).success
    fs = moto.client("s3")
    staging = "restart/_staging/labeled_pairs/source=wudao/shard=0/"
    outage = {}

    def restart_when_labeling_started():
        deadline = time.time() + 300
        while not fs.list_objects_v2(Bucket="kun", Prefix=staging).get("KeyCount") and time.time() < deadline:
            time.sleep(0.05)
        proxy.down()
        outage["checkpoints_before"] = fs.list_objects_v2(Bucket="kun", Prefix=staging)["KeyCount"]
        t0 = time.time()
        while time.time() - t0 < 3:  # count clients knocking while the endpoint is down
            try:
                socket.create_connection(("127.0.0.1", proxy.port), 0.1).close()
            except OSError:
                outage["probes_refused"] = outage.get("probes_refused", 0) + 1
            time.sleep(0.2)
        proxy.up()
        outage["seconds"] = time.time() - t0

    watcher = threading.Thread(target=restart_when_labeling_started, daemon=True)
    watcher.start()
    result = dg.materialize(
        list(defs.assets), selection=["labeled_pairs"], resources=defs.resources, instance=instance, partition_key="wudao|0"
    )
    watcher.join(60)
    assert outage.get("seconds", 0) >= 3 and outage["probes_refused"] > 0  # the endpoint really was down mid-run
    assert result.success
    md = result.asset_materializations_for_node("labeled_pairs")[0].metadata
    assert md["checkpoint_batches_computed"].value > outage["checkpoints_before"]  # batches were still being written
    labeled = fs.list_objects_v2(Bucket="kun", Prefix="restart/labeled_pairs/source=wudao/shard=0/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in labeled["Contents"]) == ["_stats.json", "part-0.parquet"]


def test_wrong_credentials_fail_clearly_and_the_secret_appears_nowhere(models_run, tmp_path, monkeypatch, capfd):
    server = MotoServer()
    try:
        server.client("s3").create_bucket(Bucket="kun")
        iam = server.client("iam")
        iam.create_user(UserName="kun")
        iam.put_user_policy(
            UserName="kun",
            PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
        )
        key_id = iam.create_access_key(UserName="kun")["AccessKey"]["AccessKeyId"]
        server.enforce_auth()
        wrong = "wrong-secret-4f1c9a"
        monkeypatch.setenv("KUN_S3_KEY", key_id)
        monkeypatch.setenv("KUN_S3_SECRET", wrong)
        cfg_file = _s3_config(
            tmp_path,
            models_run,
            server.url,
            **{"storage.s3": {"access_key_id_env": "KUN_S3_KEY", "secret_access_key_env": "KUN_S3_SECRET"}},
        )
        defs = build_definitions(cfg_file)
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(
            list(defs.assets), selection=["seed_data"], resources=defs.resources, instance=instance, raise_on_error=False
        )
        assert not result.success
        error = str([e.event_specific_data.error for e in result.all_events if e.is_failure])
        assert "refused the credentials" in error and "$KUN_S3_KEY / $KUN_S3_SECRET (values not shown)" in error
        assert server.url in error
        logs = [str(entry) for entry in instance.all_logs(result.run_id)]
        out, err = capfd.readouterr()
        assert logs and not any(wrong in line for line in logs) and wrong not in error and wrong not in out + err
    finally:
        server.stop()


def _tables(fs, base: str) -> dict[str, list[dict]]:
    """Every stage's rows and quarantine under `base`, in a stable order."""
    out = {}
    for asset in CORPUS + ["instruction_dataset"]:
        for name, path in ((asset, f"{base}/{asset}"), (f"quarantine/{asset}", f"{base}/quarantine/{asset}")):
            if fs.exists(path):
                rows = pads.dataset(path, filesystem=fs, partitioning="hive").to_table().to_pylist()
                out[name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


def test_steps_that_share_nothing_but_s3_and_postgres_make_the_same_release(s3_run, moto, postgres, tmp_path):
    """The graph as Kubernetes runs it: every step a fresh `dagster api execute_step` process in its
    own empty working folder, HOME and TMPDIR (tests/share_nothing.py), the run worker another, the
    instance on PostgreSQL, and everything else on S3: corpus, seeds, given models, partitions,
    checkpoints; each step copies the models it needs into its own `~` cache. It makes what the
    single-process run of s3_run made."""
    s3, fs = moto.client("s3"), s3_run["fs"]
    cfg = yaml.safe_load((s3_run["tmp"] / "kun.yaml").read_text())
    seed = Path(cfg["seed"]["uri"])
    s3.upload_file(str(seed), "kun", f"seed/{seed.name}")
    cfg["seed"]["uri"] = f"s3://kun/seed/{seed.name}"
    for role in ("base", "chat"):
        local = Path(cfg["models"][role]["path"])
        _upload_folder(s3, local, f"given/{role}")
        cfg["models"][role]["path"] = f"s3://kun/given/{role}"
    cfg["storage"] |= {"base_uri": "s3://kun/pods", "models_dir": "s3://kun/pods/models", "model_cache": "~/.cache/kun/models"}
    uris = [s["uri"] for s in cfg["sources"] if s["name"] == "wudao"] + [cfg["seed"]["uri"]]
    uris += [cfg["models"][r]["path"] for r in ("base", "label", "chat")] + [cfg["storage"][k] for k in ("base_uri", "models_dir")]
    assert all(u.startswith("s3://") for u in uris), uris  # no local path is left for a step to lean on
    image = tmp_path / "image"  # what the container image holds beside the code: the config
    image.mkdir()
    (image / "kun.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    home = tmp_path / "dagster_home"
    settings = yaml.safe_load(instance_yaml(home, postgres.database()).read_text())
    noop = {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    (home / "dagster.yaml").write_text(yaml.safe_dump({**settings, "compute_logs": noop}))  # as the Helm chart's default
    runner = tmp_path / "runner"  # the run worker: a pod too
    (runner / "home").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k in share_nothing.PASSED}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the image's Python, whose `dagster` runs each step
    env |= {"PYTHONPATH": str(REPO), "KUN_CONFIG": str(image / "kun.yaml"), "DAGSTER_HOME": str(home), "HOME": str(runner / "home")}
    env |= {"KUN_TEST_PODS": str(tmp_path / "pods"), "HF_HUB_OFFLINE": "1", **CREDS}
    dagster = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "tests.share_nothing", "--select"]
    for what in (
        [",".join(MODELS)],
        [",".join(CORPUS), "--partition-range", "wudao|0...wudao|1"],
        ["instruction_dataset,dataset_card", "--partition", "wudao"],
    ):
        done = subprocess.run(dagster + what, cwd=runner, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pods = sorted((tmp_path / "pods").iterdir())
    assert len(pods) == len(MODELS) + len(CORPUS) + 2, [p.name for p in pods]  # one process per step
    for pod in pods:  # each step copied the models it used into its own home, and into no other folder
        assert not list((pod / "work").iterdir()), pod
    cached = {pod.name.split("-", 1)[1]: sorted(p.name for p in (pod / "home/.cache/kun/models").glob("*")) for pod in pods}
    assert [n.split("-")[0] for n in cached["labeled_pairs"]] == ["label"] and cached["raw_corpus"] == []
    assert sorted(p.name for p in image.iterdir()) == ["kun.yaml"]  # nothing written beside the config
    assert sorted(p.name for p in home.iterdir()) == ["dagster.yaml"]  # nor in the instance's folder
    instance = dg.DagsterInstance.from_config(str(home))
    runs = instance.get_runs()
    assert len(runs) == 3 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}

    fs.invalidate_cache()  # s3fs keeps listings and ETags from the tests before
    ours, single = _tables(fs, "kun/pods"), _tables(fs, "kun/data")
    assert ours.keys() == single.keys() and ours["instruction_dataset"]
    for name in single:
        assert ours[name] == single[name], name
    assert fs.cat("kun/pods/release/wudao/train.jsonl") == fs.cat("kun/data/release/wudao/train.jsonl")
