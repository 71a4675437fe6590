"""The Dagster definitions: they load in `dagster`, and they are shaped for GPU backfills."""

import json
import os
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from kun_dagster import registry
from kun_dagster.definitions import build_definitions

from .conftest import REPO, write_config

GPU_ASSETS = ["base_model", "label_model", "chat_model", "filtered_corpus", "labeled_pairs", "scored_pairs", "polished_pairs"]


@pytest.fixture(scope="module")
def defs(tmp_path_factory):
    return build_definitions(write_config(tmp_path_factory.mktemp("defs"), shards=4))


def test_dagster_definitions_validate_loads_the_workspace(tmp_path):
    env = {**os.environ, "KUN_CONFIG": str(write_config(tmp_path)), "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_loading_the_code_location_imports_no_torch_transformers_or_scipy(tmp_path):
    """Every process dagster starts (code server, run worker, step) loads the code location: the
    heavy libraries wait until a step uses them (8.6 s and 390 MB a process when they did not)."""
    env = {**os.environ, "KUN_CONFIG": str(write_config(tmp_path)), "DAGSTER_HOME": str(tmp_path)}
    probe = "import sys; from kun_dagster.definitions import defs; print(sorted(m for m in ('torch', 'transformers', 'scipy', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_one_source_backfill_is_one_run(defs):
    pdef = defs.resolve_asset_graph().get(dg.AssetKey("labeled_pairs")).partitions_def
    keys = [k for k in pdef.get_partition_keys() if k.keys_by_dimension["source"] == "wanjuan"]
    assert len(keys) == 4
    ranges = pdef.subset_with_partition_keys(keys).get_partition_key_ranges(pdef)
    assert len(ranges) == 1  # contiguous: a single-run backfill launches one run for it


def test_gpu_assets_share_the_pool_and_run_backfills_in_one_run(defs):
    graph = defs.resolve_asset_graph()
    for name in GPU_ASSETS:
        node = graph.get(dg.AssetKey(name))
        assert node.pools == {"gpu"}, name
        if node.partitions_def is not None:
            assert node.backfill_policy == dg.BackfillPolicy.single_run(), name
    assert graph.get(dg.AssetKey("raw_corpus")).pools in (set(), None, frozenset())


def test_asset_graph_shape(defs):
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys()}
    assert parents["minhash_signatures"] == ["filtered_corpus"]
    assert parents["duplicate_clusters"] == ["minhash_signatures"]
    assert parents["deduped_corpus"] == ["duplicate_clusters", "filtered_corpus"]
    assert parents["labeled_pairs"] == ["deduped_corpus", "label_model"]
    assert parents["scored_pairs"] == ["chat_model", "labeled_pairs"]
    # the release reads every stage of the funnel as a declared input; the card reads the release
    assert parents["instruction_dataset"] == sorted(["chat_model", "label_model", "seed_data", *registry.CORPUS])
    assert parents["dataset_card"] == ["instruction_dataset"]
    assert parents["label_model"] == ["base_model", "seed_data"]


def test_cli_validate_reports_bad_config(tmp_path):
    bad = tmp_path / "kun.yaml"
    bad.write_text("sources: [{name: web, uri: x, format: csv}]\nseed: {uri: s}\n")
    out = subprocess.run([sys.executable, "-m", "kun_dagster.cli", "validate", "--config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "sources.0.format" in out.stderr


def test_asset_kinds_name_engine_schema_format_and_store(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    local = build_definitions(write_config(tmp_path / "a")).resolve_asset_graph()
    assert local.get(dg.AssetKey("labeled_pairs")).kinds == {"pytorch", "pandera", "parquet"}  # tests pin transformers
    assert local.get(dg.AssetKey("raw_corpus")).kinds == {"pandera", "parquet"}
    cfg = write_config(
        tmp_path / "b", **{"models.label.backend": "vllm", "storage.base_uri": "s3://bucket/kun", "filter.perplexity_max": None}
    )
    s3 = build_definitions(cfg).resolve_asset_graph()
    assert s3.get(dg.AssetKey("labeled_pairs")).kinds == {"vllm", "pandera", "parquet", "s3"}
    assert s3.get(dg.AssetKey("filtered_corpus")).kinds == {"pandera", "parquet", "s3"}  # no perplexity: no engine
    assert s3.get(dg.AssetKey("instruction_dataset")).kinds == {"pandera", "parquet", "s3"}
    assert s3.get(dg.AssetKey("dataset_card")).kinds == {"json", "s3"}
    assert s3.get(dg.AssetKey("seed_data")).kinds == {"json", "parquet", "s3"}


def test_the_instance_yaml_limits_the_gpu_pool_queues_runs_and_retries(tmp_path):
    import shutil

    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    config = instance.get_concurrency_config()
    assert config.pool_config.default_pool_limit == 1  # the gpu pool: one GPU step at a time
    assert config.run_queue_config.max_concurrent_runs == 4
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert not instance.run_retries_retry_on_asset_or_op_failure


def test_the_production_instance_file_is_the_repos_on_postgresql(postgres, tmp_path, monkeypatch):
    """deploy/dagster.postgres.yaml: the repo's instance settings, its storage on PostgreSQL from
    the environment; an instance made from it runs, queues and limits as the repo's does."""
    import shutil
    from urllib.parse import urlparse

    prod = yaml.safe_load((REPO / "deploy" / "dagster.postgres.yaml").read_text())
    assert {k: v for k, v in prod.items() if k != "storage"} == yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert "password: {env: DAGSTER_PG_PASSWORD}" in (REPO / "deploy" / "dagster.postgres.yaml").read_text()
    url = urlparse(postgres.dsn(urlparse(postgres.database()).path.lstrip("/")))
    for var, value in {
        "HOST": url.hostname,
        "DB": url.path.lstrip("/"),
        "USER": url.username,
        "PASSWORD": "unused",
        "PORT": url.port,
    }.items():
        monkeypatch.setenv(f"DAGSTER_PG_{var}", str(value))  # trust auth on the test server: the password is not checked
    shutil.copy(REPO / "deploy" / "dagster.postgres.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_retries_enabled and type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

        @dg.asset
        def one():
            return 1

        assert dg.materialize([one], instance=instance).success
        assert instance.fetch_materializations(dg.AssetKey("one"), limit=1).records


def test_definitions_build_with_the_kubernetes_executor_and_gpu_requests(tmp_path):
    cfg = write_config(
        tmp_path,
        **{
            "deploy.executor": "k8s",
            "deploy.k8s": {"job_namespace": "kun", "env_secrets": ["kun-s3"]},
            "models.chat.vllm": {"tensor_parallel_size": 2},
        },
    )
    defs = build_definitions(cfg)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    graph = defs.resolve_asset_graph()

    def gpus(name):
        tags = json.loads(graph.get(dg.AssetKey(name)).assets_def.op.tags["dagster-k8s/config"])  # tags hold strings
        return tags["container_config"]["resources"]["limits"]["nvidia.com/gpu"]

    assert gpus("labeled_pairs") == "1" and gpus("scored_pairs") == gpus("polished_pairs") == "2"  # chat: tensor parallel 2
    assert gpus("label_model") == "1" and "dagster-k8s/config" not in graph.get(dg.AssetKey("raw_corpus")).assets_def.op.tags


def test_every_asset_carries_the_configured_owners_and_a_bad_owner_names_the_key(tmp_path):
    defs = build_definitions(write_config(tmp_path, **{"deploy.owners": ["team:data-eng", "ml@example.com"]}))
    graph = defs.resolve_asset_graph()
    assert {tuple(graph.get(k).owners) for k in graph.get_all_asset_keys()} == {("team:data-eng", "ml@example.com")}
    from kun_dagster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"deploy.owners: .*emails or team:name .*'data eng'"):
        load_config(write_config(tmp_path, **{"deploy.owners": ["data eng"]}))


def test_each_roles_engine_runs_as_its_config_says_and_its_kind_says_so(tmp_path, monkeypatch):
    """One typed path from models.<role> to the engine: the spec carries the role's settings as
    parsed, and an asset's kind names the engine it will run (filtered_corpus on the label model
    runs with the label role's settings, not the base role's)."""
    import types

    from kun_dagster.config import load_config

    cfg_file = write_config(
        tmp_path,
        **{
            "models.chat.dtype": "bfloat16",
            "models.chat.vllm.max_model_len": 1024,
            "models.base.backend": "vllm",
            "filter.perplexity_model": "label",
        },
    )
    defs = build_definitions(cfg_file)
    seen = []
    monkeypatch.setattr("resources.llm.load_engine", lambda spec: seen.append(spec) or types.SimpleNamespace(close=lambda: None))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for role in ("chat", "label"):
        defs.resources[f"{role}_llm"].engine({"path": str(model), "name": "m"})
    cfg = load_config(cfg_file)
    assert [s.settings for s in seen] == [cfg.models.chat, cfg.models.label]
    assert seen[0].settings.vllm.max_model_len == 1024 and seen[0].settings.dtype == "bfloat16"
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("filtered_corpus")).kinds == {"pytorch", "pandera", "parquet"}  # label: transformers
