"""Dagster's private names are pinned to the version they were checked against: an upgrade that
moves or changes one fails here, by name, instead of deep inside a run."""

import importlib.metadata
import inspect

import dagster as dg

from kun_dagster import dagster_private as private


def test_the_private_names_are_those_of_the_pinned_dagster():
    assert importlib.metadata.version("dagster") == private.PINNED == dg.__version__
    assert private.CODE_VERSION_TAG == "dagster/code_version" and private.DATA_VERSION_TAG == "dagster/data_version"
    assert private.INPUT_DATA_VERSION_TAG_PREFIX == "dagster/input_data_version"
    assert (private.DEFAULT_DATA_VERSION.value, private.NULL_DATA_VERSION.value) == ("INITIAL", "NULL")
    for fn in (private.extract_data_provenance_from_entry, private.extract_data_version_from_entry):
        assert list(inspect.signature(fn).parameters) == ["entry"]
    assert (private.ASSET_PARTITION_RANGE_START_TAG, private.ASSET_PARTITION_RANGE_END_TAG) == (
        "dagster/asset_partition_range_start",
        "dagster/asset_partition_range_end",
    )
    assert {s.name for s in private.StaleStatus} >= {"STALE", "FRESH", "MISSING"}
    assert {s.name for s in private.AssetCheckExecutionRecordStatus} >= {"PLANNED", "SUCCEEDED", "FAILED"}
    params = list(inspect.signature(private.CachingStaleStatusResolver).parameters)
    assert params[:3] == ["instance", "asset_graph", "loading_context"]
    assert {"get_status", "get_stale_causes"} <= set(dir(private.CachingStaleStatusResolver))
    assert private.AssetKeyPartitionKey(dg.AssetKey("a"), "p").partition_key == "p"
    with dg.instance_for_test() as instance:  # a local instance: SQLite run storage, as recovery tells it
        assert isinstance(instance.run_storage, private.SqliteRunStorage)
    assert not isinstance(dg.DagsterInstance.ephemeral().run_storage, private.SqliteRunStorage)  # in memory


def test_no_module_but_the_door_imports_dagster_privately():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    found = [
        str(p.relative_to(root))
        for d in ("kun_dagster", "assets", "checks", "resources", "automation")
        for p in (root / d).rglob("*.py")
        if re.search(r"^\s*(from|import) dagster\._", p.read_text(encoding="utf-8"), re.M) and p.name != "dagster_private.py"
    ]
    assert found == []
