"""What `kun run` must make before each step group: which of its assets and partitions are missing
or stale, by the rule of Dagster's resolver (what the UI shows), read in bulk. The graph-wide view
the tests use (every partition downstream of a stale one) is tests/stale.py.

Dagster's CachingStaleStatusResolver reads two or three records per partition: about 2,400 queries
(13-15 s on SQLite) for 3 sources x 100 shards, minutes at thousands. `Statuses` applies the same
rule (missing; a new code version; an input added or removed; an input partition with a new data
version since the one this partition was made from) from two queries per asset: the latest storage
id of every partition, then those records. Only where an input partition did change does it read
that input's version before, as the resolver does. One difference, on purpose: the resolver skips
an input of 100 partitions or more (SKIP_PARTITION_DATA_VERSION_DEPENDENCY_THRESHOLD), so a shard
changed under a release of 100+ shards would leave the release "fresh"; this reads them all.
tests/test_stale.py holds the two to the same answers below that size.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import dagster as dg

from kun_dagster.dagster_private import (
    DEFAULT_DATA_VERSION,
    NULL_DATA_VERSION,
    StaleStatus,
    extract_data_provenance_from_entry,
    extract_data_version_from_entry,
)

CHUNK = 500  # storage ids per query: well inside SQLite's and Postgres's bound-parameter limits


class Statuses:
    """Stale status of many (asset, partition)s from a few queries per asset; one instance per
    decision (it caches what it read, as the resolver does within a request)."""

    def __init__(self, instance: dg.DagsterInstance, graph):
        self.instance, self.graph = instance, graph
        self._latest: dict[dg.AssetKey, dict] = {}
        self._sorted: dict[dg.AssetKey, tuple[list[int], list]] = {}
        self._mapped: dict[tuple, frozenset] = {}

    def latest(self, key: dg.AssetKey) -> dict:
        """{partition key (None: unpartitioned): the record its current data version comes from}:
        its latest materialization, or for an observable source its latest observation."""
        if key in self._latest:
            return self._latest[key]
        node = self.graph.get(key)
        if not node.is_partitioned:
            record = self.instance.get_latest_data_version_record(key, node.is_external)
            found = {None: record} if record else {}
        else:
            found = {}
            kinds = [dg.DagsterEventType.ASSET_MATERIALIZATION]
            if node.is_observable:
                kinds.append(dg.DagsterEventType.ASSET_OBSERVATION)
            for kind in kinds:
                ids = sorted(self.instance.get_latest_storage_id_by_partition(key, kind).values())
                fetch = (
                    self.instance.fetch_observations
                    if kind == dg.DagsterEventType.ASSET_OBSERVATION
                    else self.instance.fetch_materializations
                )
                for i in range(0, len(ids), CHUNK):
                    chunk = ids[i : i + CHUNK]
                    for record in fetch(dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk), limit=len(chunk)).records:
                        pk = record.partition_key
                        if pk not in found or found[pk].storage_id < record.storage_id:
                            found[pk] = record
        self._latest[key] = found
        return found

    def version(self, key: dg.AssetKey, pk: str | None):
        record = self.latest(key).get(pk)
        if record is None:
            return DEFAULT_DATA_VERSION if self.graph.get(key).is_external else NULL_DATA_VERSION
        return extract_data_version_from_entry(record.event_log_entry) or DEFAULT_DATA_VERSION

    def status(self, key: dg.AssetKey, pk: str | None) -> StaleStatus:
        node = self.graph.get(key)
        if node.is_partitioned and pk is None:
            return StaleStatus.FRESH
        record = self.latest(key).get(pk)
        if record is None:
            return StaleStatus.FRESH if node.is_external else StaleStatus.MISSING
        if node.is_external:
            return StaleStatus.FRESH
        return StaleStatus.STALE if self._stale(key, pk, record) else StaleStatus.FRESH

    def _stale(self, key: dg.AssetKey, pk: str | None, record) -> bool:
        node = self.graph.get(key)
        made = extract_data_provenance_from_entry(record.event_log_entry)
        if made is None:  # made before Dagster kept provenance: a missing or newer input counts
            for dep in node.parent_keys:
                pks = self.parents(key, pk, dep)
                got = self._records(dep, pks)
                if not self.graph.get(dep).is_external and (len(got) < len(pks) or any(r.timestamp > record.timestamp for r in got)):
                    return True
            return False
        if node.code_version and node.code_version != made.code_version:
            return True
        if set(made.input_data_versions) - set(node.parent_keys):  # an input removed
            return True
        for dep in node.parent_keys:
            if not made.has_input_asset(dep):  # an input added (the resolver skips one mapped to no partition: none here is)
                return True
            if not self.graph.get(dep).is_partitioned:
                if _differ(made.input_data_versions[dep], self.version(dep, None)):
                    return True
            elif self._updated(key, pk, dep, made.input_storage_ids[dep]):
                return True
        return False

    def parents(self, key: dg.AssetKey, pk: str | None, dep: dg.AssetKey) -> tuple:
        """The partitions of `dep` that partition `pk` of `key` reads (by the graph's mappings)."""
        if not self.graph.get(dep).is_partitioned:
            return (None,)
        got = self.graph.get_parent_partition_keys_for_child(pk, dep, key).partitions_subset.get_partition_keys()
        return tuple(got)

    def _records(self, dep: dg.AssetKey, pks: Iterable):
        latest = self.latest(dep)
        return [latest[p] for p in pks if p in latest]

    def _updated(self, key: dg.AssetKey, pk: str | None, dep: dg.AssetKey, cursor: int | None) -> bool:
        """Whether an input partition of `dep` that partition `pk` reads has a new data version since
        storage id `cursor` (the input's latest event when `pk` was made): the resolver's
        _is_dep_updated. It starts from `dep`'s partitions made after the cursor, most often none,
        and maps only those to their children: mapping every child to its inputs costs 13 ms a
        child where a shard's clusters read a thousand shards."""
        if not cursor:
            return False  # as the resolver: the record after "nothing" is the latest, never newer than itself
        ids, records = self._by_storage_id(dep)
        external = self.graph.get(dep).is_external
        for record in records[bisect.bisect_right(ids, cursor) :]:
            if pk not in self._children(dep, record.partition_key, key):
                continue
            before = self.instance.get_latest_data_version_record(dep, external, record.partition_key, before_cursor=cursor + 1)
            was = extract_data_version_from_entry(before.event_log_entry) if before else None
            if _differ(was, extract_data_version_from_entry(record.event_log_entry)):
                return True
        return False

    def _by_storage_id(self, dep: dg.AssetKey) -> tuple[list[int], list]:
        if dep not in self._sorted:
            records = sorted(self.latest(dep).values(), key=lambda r: r.storage_id)
            self._sorted[dep] = ([r.storage_id for r in records], records)
        return self._sorted[dep]

    def _children(self, dep: dg.AssetKey, dep_pk: str, key: dg.AssetKey) -> frozenset:
        at = (dep, dep_pk, key)
        if at not in self._mapped:
            self._mapped[at] = frozenset(self.graph.get_child_partition_keys_of_parent(dep_pk, dep, key))
        return self._mapped[at]


def _differ(before, now) -> bool:
    """The resolver's comparison: a version recorded as the default against an input never made is
    no change (an external asset seen from another code location)."""
    return not (before == DEFAULT_DATA_VERSION and now == NULL_DATA_VERSION) and before != now


def to_make(graph, instance: dg.DagsterInstance, assets: list[str], keys: list | None) -> tuple[list[str], list]:
    """What a run of `assets` (in graph order) over partition `keys` (None: unpartitioned) must
    make: the assets missing or stale on some key, with everything below them among `assets`
    (their inputs are about to change, which no resolver can know yet), and the keys where any is
    missing or stale. ([], []) when everything is fresh."""
    statuses = Statuses(instance, graph)
    hit: set[str] = set()
    where = []
    for pk in keys if keys is not None else [None]:
        found = {a for a in assets if statuses.status(dg.AssetKey(a), pk) != StaleStatus.FRESH}
        if found:
            hit |= found
            where.append(pk)
    chosen: list[str] = []
    for a in assets:
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(a)).parent_keys}
        if a in hit or parents & set(chosen):
            chosen.append(a)
    return chosen, where
