"""`kun run`'s bulk stale status (automation/stale.Statuses) against the rule it stands for,
Dagster's own resolver (what the UI shows), on a graph of the pipeline's shapes: an observed
partitioned source, an identity-mapped stage, an unpartitioned model input, a per-source release
over every shard. Through each change a pipeline meets, the two agree on every partition, on
SQLite and on PostgreSQL; past the resolver's 100-partition limit only the bulk read still sees a
shard change under the release."""

import dagster as dg
import pytest

from automation.stale import Statuses
from kun_dagster.dagster_private import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    DATA_VERSION_TAG,
    CachingStaleStatusResolver,
    LoadingContextForTest,
    StaleStatus,
)

VERSIONS: dict[str, str] = {}  # asset -> the data version its next materialization records


def graph(shards: int, code: str = "1", names=("a", "b")):
    parts = dg.MultiPartitionsDefinition(
        {"source": dg.StaticPartitionsDefinition(list(names)), "shard": dg.StaticPartitionsDefinition([f"{i:04d}" for i in range(shards)])}
    )
    sources = dg.StaticPartitionsDefinition(list(names))
    files = dg.AssetSpec("files", partitions_def=parts)

    @dg.multi_observable_source_asset(specs=[files], partitions_def=parts)
    def observe():
        return dg.DataVersionsByPartition({})

    def made(name):
        return dg.MaterializeResult(data_version=dg.DataVersion(VERSIONS.get(name, "v0")))

    policy = dg.BackfillPolicy.single_run()

    @dg.asset(partitions_def=parts, deps=["files"], code_version="1", backfill_policy=policy)
    def raw():
        return made("raw")

    @dg.asset(code_version="1")
    def model():
        return made("model")

    @dg.asset(partitions_def=parts, deps=["raw", "model"], code_version=code, backfill_policy=policy)
    def labeled():
        return made("labeled")

    @dg.asset(
        partitions_def=sources,
        deps=[dg.AssetDep("labeled", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("source"))],
        code_version="1",
        backfill_policy=policy,
    )
    def release():
        return made("release")

    return dg.Definitions(assets=[observe, raw, model, labeled, release])


def observe_files(instance, keys, version):
    for k in keys:
        instance.report_runless_asset_event(dg.AssetObservation("files", partition=k, tags={DATA_VERSION_TAG: version}))


def run(defs, instance, assets, keys=None):
    """Materialize `assets` over partition `keys` (a range, as `kun run` does) in one run."""
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]} if keys else {}
    job = dg.define_asset_job("j", selection=assets)
    defs = dg.Definitions(assets=defs.assets, jobs=[job])
    assert defs.resolve_job_def("j").execute_in_process(instance=instance, tags=tags).success


def statuses(defs, instance):
    """{(asset, partition): (bulk status, resolver status)} over every materializable partition."""
    g = defs.resolve_asset_graph()
    ours, theirs = Statuses(instance, g), CachingStaleStatusResolver(instance, g, LoadingContextForTest(instance))
    out = {}
    for key in g.materializable_asset_keys:
        pd = g.get(key).partitions_def
        for pk in pd.get_partition_keys() if pd else [None]:
            out[(key.to_user_string(), pk)] = (ours.status(key, pk), theirs.get_status(key, pk))
    return out


def stale(view, which=0):
    return sorted(k for k, v in view.items() if v[which] != StaleStatus.FRESH)


@pytest.fixture
def instance(storage_url, tmp_path):
    with dg.instance_for_test(
        temp_dir=str(tmp_path), overrides=None if storage_url is None else {"storage": {"postgres": {"postgres_url": storage_url}}}
    ) as inst:
        VERSIONS.clear()
        yield inst


def test_the_bulk_status_is_the_resolvers_through_every_change(instance):
    defs = graph(3)
    keys = sorted(defs.resolve_asset_graph().get(dg.AssetKey("raw")).partitions_def.get_partition_keys())
    agree = lambda: [k for k, (a, b) in statuses(defs, instance).items() if a != b]  # noqa: E731

    view = statuses(defs, instance)
    assert {a for a, _ in view.values()} == {StaleStatus.MISSING} and agree() == []
    observe_files(instance, keys, "f0")
    run(defs, instance, ["model"])
    run(defs, instance, ["raw", "labeled"], keys)
    run(defs, instance, ["release"], ["a", "b"])
    assert stale(statuses(defs, instance)) == [] and agree() == []

    observe_files(instance, [keys[1]], "f1")  # a file changed in one shard
    assert stale(statuses(defs, instance)) == [("raw", keys[1])] and agree() == []
    run(defs, instance, ["raw"], [keys[1]])  # re-ingested, to the same data: nothing below moves
    assert stale(statuses(defs, instance)) == [] and agree() == []

    VERSIONS["model"] = "m1"  # a new model: every labeled partition
    run(defs, instance, ["model"])
    assert stale(statuses(defs, instance)) == sorted(("labeled", k) for k in keys) and agree() == []

    VERSIONS["labeled"] = "l1"  # one shard of source a relabeled with new data: its release, not b's
    run(defs, instance, ["labeled"], keys)
    run(defs, instance, ["release"], ["a", "b"])
    VERSIONS["labeled"] = "l2"
    run(defs, instance, ["labeled"], [keys[0]])
    assert stale(statuses(defs, instance)) == [("release", "a")] and agree() == []

    view = statuses(graph(3, code="2"), instance)  # labeled's code changed
    assert {k for k, (a, b) in view.items() if a != StaleStatus.FRESH} >= {("labeled", k) for k in keys}
    assert [k for k, (a, b) in view.items() if a != b] == []


def test_past_the_resolvers_limit_a_changed_shard_still_stales_its_release(tmp_path):
    """The resolver skips an input of 100+ partitions (a release over 100 shards); the bulk read
    does not. The rule is storage's no more than the first test's: SQLite alone."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        VERSIONS.clear()
        big = graph(100, names=("a",))
        keys = sorted(big.resolve_asset_graph().get(dg.AssetKey("raw")).partitions_def.get_partition_keys())
        observe_files(instance, keys, "f0")
        run(big, instance, ["model"])
        run(big, instance, ["raw", "labeled"], keys)
        run(big, instance, ["release"], ["a"])
        assert stale(statuses(big, instance)) == []
        VERSIONS["labeled"] = "l1"
        run(big, instance, ["labeled"], [keys[7]])
        view = statuses(big, instance)
        assert stale(view) == [("release", "a")]  # the bulk read sees it...
        assert stale(view, 1) == []  # ...Dagster's resolver does not
