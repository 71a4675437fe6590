"""Shared fixtures: a test config over the demo corpora, and the tiny models built once per session."""

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = ["seed_data", "base_model", "label_model", "chat_model"]  # the unpartitioned assets
CORPUS = ["raw_corpus", "filtered_corpus", "labeled_pairs", "scored_pairs", "polished_pairs"]  # source x shard
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine in-process: seconds, not a minute, to start
warnings.filterwarnings("ignore", module="dagster")


def write_config(tmp: Path, **overrides) -> Path:
    """The repo's kun.yaml with absolute demo paths, local storage under tmp, and quick settings."""
    cfg = yaml.safe_load((REPO / "kun.yaml").read_text())
    for s in cfg["sources"]:
        s["uri"] = str(REPO / s["uri"])
    cfg["seed"]["uri"] = str(REPO / cfg["seed"]["uri"])
    cfg["storage"] = {"base_uri": str(tmp / "data")}
    cfg["models"]["base"]["tiny"]["pretrain_epochs"] = 8  # fewer than the demo's 20: a weaker but quicker base
    cfg["sampling"]["max_tokens"] = 64
    cfg["filter"]["perplexity_max"] = 1e5  # computed, but the weaker base must not drop real text
    for role in ("base", "label", "chat"):  # the reference engine; tests/test_vllm.py runs the graph on vLLM
        cfg["models"][role]["backend"] = "transformers"
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / "kun.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def given_models(models_run) -> dict[str, str]:
    """write_config overrides that use the session's trained models as given checkpoints."""
    return {f"models.{r}.path": models_run["refs"][f"{r}_model"]["path"] for r in ("base", "label", "chat")}


def figures(table) -> dict:
    """A two-column table metadata value (checks.tables.figures) back as {first column: second}."""
    key, value = (c.name for c in table.schema.columns[:2])
    return {r.data[key]: r.data[value] for r in table.records}


@pytest.fixture(scope="session")
def planted() -> list[dict]:
    return json.loads((REPO / "demo" / "planted.json").read_text())


@pytest.fixture(scope="session")
def session_cfg_file(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("kun"))


@pytest.fixture(scope="session")
def models_run(session_cfg_file):
    """seed_data, base_model, label_model and chat_model materialized once through Dagster."""
    import dagster as dg

    from kun_dagster.definitions import build_definitions

    defs = build_definitions(session_cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(list(defs.assets), selection=MODELS,
                            resources=defs.resources, instance=instance)
    assert result.success
    refs = {k: result.output_for_node(k) for k in ("base_model", "label_model", "chat_model")}
    return {"defs": defs, "instance": instance, "refs": refs, "cfg_file": session_cfg_file}


@pytest.fixture(scope="session")
def label_engine(models_run):
    from kun_dagster.llm import load_engine
    from kun_dagster.llm.base import EngineSpec

    ref = models_run["refs"]["label_model"]
    return load_engine(EngineSpec(path=ref["path"], model_name=ref["name"], backend="transformers", batch_size=8))


@pytest.fixture(scope="session")
def base_engine(models_run):
    from kun_dagster.llm import load_engine
    from kun_dagster.llm.base import EngineSpec

    ref = models_run["refs"]["base_model"]
    return load_engine(EngineSpec(path=ref["path"], model_name=ref["name"], backend="transformers", batch_size=8))
