"""The registry of dataset versions is the one place for each asset's name, schema, reason codes
and WARN checks: everything else agrees with it."""

import dagster as dg

from kun_dagster import corpus, stages, versions
from kun_dagster.definitions import build_definitions

from .conftest import write_config


def _codes(module) -> set[str]:
    """The reason-code constants a module defines (NAME = "name")."""
    return {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v == k.lower()}


def test_every_reason_code_a_stage_can_write_belongs_to_a_version():
    listed = {r for v in versions.VERSIONS for r in v.reasons}
    assert _codes(corpus) | _codes(stages) == listed
    assert set(versions.get(versions.RAW).reasons) == _codes(corpus)  # ingest's codes are raw_corpus's alone


def test_the_graph_the_checks_and_the_registry_name_the_same_versions(tmp_path):
    graph = build_definitions(write_config(tmp_path)).resolve_asset_graph()
    for v in versions.VERSIONS:
        node = graph.get(dg.AssetKey(v.name))
        checks = [k.name for k in node.check_keys]
        assert sorted(checks) == sorted(["schema", *(c.name for c in v.checks)]), v.name
        assert len({c.name for c in v.checks}) == len(v.checks)
    partitioned = [
        k.path[0]
        for k in graph.get_all_asset_keys()
        if isinstance(graph.get(k).partitions_def, dg.MultiPartitionsDefinition) and graph.get(k).is_materializable  # not source_files
    ]
    assert sorted(partitioned) == sorted(versions.PARTITIONED) and set(versions.CORPUS) < set(versions.PARTITIONED)
    parents = {v: [p.path[0] for p in graph.get(dg.AssetKey(v)).parent_keys] for v in versions.PARTITIONED[1:]}
    for earlier, later in zip(versions.PARTITIONED, versions.PARTITIONED[1:]):
        assert earlier in parents[later]  # graph order


def test_the_retention_bounds_kun_yaml_accepts_are_the_versions_with_a_retention_check():
    from kun_dagster.config import RETENTION

    assert set(RETENTION) == {v.name for v in versions.VERSIONS if any(c.name == "retention" for c in v.checks)}
