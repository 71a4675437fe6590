"""Code versions (issue 17, first part): a kun.yaml key or prompt text changes the code version of
exactly the assets it shapes; keys that change how, not what, change none."""

import dagster as dg
import pytest

from kun_dagster import code_versions, prompts, registry
from kun_dagster.config import parse_config
from kun_dagster.definitions import build_definitions
from kun_dagster.registry import ROUND_STAGES, SOURCE_FILES, split_round

from .conftest import write_config

BASE = {"sources": [{"name": "web", "uri": "x", "format": "jsonl"}], "seed": {"uri": "s"}}


def versions_of(**changes) -> dict[str, str]:
    data = {**BASE}
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = parse_config(data, env={})
    return {a: code_versions.code_version(a, cfg) for a in registry.BY_NAME}


def changed(**changes) -> set[str]:
    before, after = versions_of(), versions_of(**changes)
    return {a for a in before if before[a] != after[a]}


@pytest.mark.parametrize(
    "change,stale",
    [
        ({"score__threshold": 0.7}, {"polished_pairs", "dataset_card"}),  # nothing re-scores; the release follows by data
        ({"score__method": "kun_freetext"}, {"scored_pairs", "dataset_card"}),
        ({"label__banned_keywords": ["新闻"]}, {"labeled_pairs"}),
        ({"sampling__temperature": 0.7}, {"labeled_pairs", "scored_pairs", "polished_pairs"}),
        ({"dedup__threshold": 0.9}, {"lsh_band_pairs", "duplicate_clusters", "instruction_dataset", "dataset_card"}),
        ({"dedup__ngram": 4}, {"minhash_signatures"}),
        ({"filter__max_tokens": 256}, {"filtered_corpus"}),
        ({"models__chat__dtype": "bfloat16"}, {"scored_pairs", "polished_pairs", "evaluation"}),
        ({"tags": {"domains": ["通用", "医学", "其他"]}}, {"polished_pairs"}),
        ({"iterations": 2}, {"dataset_card"}),  # release/{source} is the last round's
        ({"evaluation__max_tokens": 64}, {"evaluation"}),
        ({"seed__eval_fraction": 0.2}, {"seed_data"}),  # the models follow by its data version
        ({"models__label__train": {"epochs": 3}}, {"label_model"}),
        ({"shards": 8}, {"raw_corpus", "base_model"}),
    ],
)
def test_a_key_changes_the_code_version_of_exactly_the_assets_it_shapes(change, stale):
    assert changed(**change) == stale


def test_keys_that_change_how_not_what_change_no_code_version():
    assert not changed(
        storage__checkpoint_rows=7,
        storage__batch_rows=100,
        deploy__owners=["a@b.c"],
        checks__max_duplicate_rate=0.5,
        models__chat__batch_size=2,
        models__chat__vllm={"kv_cache_gib": 4, "max_num_seqs": 8, "gpu_memory_utilization": 0.5},
    )


def test_a_changed_prompt_text_changes_its_stages(monkeypatch):
    before = versions_of()
    real = prompts.templates()
    monkeypatch.setattr(prompts, "templates", lambda: {**real, "labelPrompt": real["labelPrompt"] + "。"})
    after = versions_of()
    assert {a for a in before if before[a] != after[a]} == {"label_model", "labeled_pairs"}


def test_every_asset_of_the_graph_carries_its_code_version(tmp_path):
    graph = build_definitions(write_config(tmp_path, iterations=2, evaluation="on", **{"dedup.mode": "band_steps"})).resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()} - {SOURCE_FILES}  # observed: its data version is the files'
    assert {split_round(k)[0] for k in keys} == set(registry.BY_NAME)
    assert {k for k in keys if split_round(k)[1] == 2} == {f"{s}_round2" for s in ROUND_STAGES}
    cfg_versions = versions_of()
    assert all(graph.get(dg.AssetKey(k)).code_version for k in keys) and len(set(cfg_versions.values())) == len(cfg_versions)


@pytest.mark.slow
def test_a_models_data_version_is_its_content_fingerprint(models_run, tmp_path):
    """Registering the same checkpoint again keeps the data version (nothing it wrote goes stale);
    each checkpoint has its own."""
    from .conftest import MODELS, given_models

    runs = []
    for name, overrides in (("a", given_models(models_run)), ("b", given_models(models_run))):
        (tmp_path / name).mkdir()
        defs = build_definitions(write_config(tmp_path / name, **overrides))
        instance = dg.DagsterInstance.ephemeral()
        assert dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance).success
        runs.append(
            {
                m: instance.get_latest_materialization_event(dg.AssetKey(m)).asset_materialization.tags["dagster/data_version"]
                for m in MODELS[1:]
            }
        )
    refs = models_run["refs"]
    for m in MODELS[1:]:
        assert runs[0][m] == runs[1][m] == refs[m]["fingerprint"]
    assert len({runs[0][m] for m in MODELS[1:]}) == 3  # base, label and chat differ


def test_backend_auto_hashes_the_engine_that_runs(monkeypatch):
    """`auto` is vLLM where it is installed: installing it changes the text the LLM stages write,
    so their partitions must turn stale, and an explicit backend naming the same engine must not."""
    from kun_dagster.llm import factory

    monkeypatch.setattr(factory, "vllm_installed", lambda: True)
    with_vllm = versions_of()
    named = versions_of(**{f"models__{r}__backend": "vllm" for r in ("base", "label", "chat")})
    monkeypatch.setattr(factory, "vllm_installed", lambda: False)
    without = versions_of()
    assert with_vllm == named
    assert {a for a in with_vllm if with_vllm[a] != without[a]} == {
        "filtered_corpus",
        "labeled_pairs",
        "scored_pairs",
        "polished_pairs",
        "evaluation",
    }
