"""What `kun run` must make before each step group: which of its assets and partitions are missing
or stale by Dagster's resolver (what the UI shows). The graph-wide view the tests use (every
partition downstream of a stale one) is tests/stale.py.
"""

from __future__ import annotations

import dagster as dg

from kun_dagster.dagster_private import CachingStaleStatusResolver, LoadingContextForTest, StaleStatus


def to_make(graph, instance: dg.DagsterInstance, assets: list[str], keys: list | None) -> tuple[list[str], list]:
    """What a run of `assets` (in graph order) over partition `keys` (None: unpartitioned) must
    make, by Dagster's resolver: the assets missing or stale on some key, with everything below
    them among `assets` (their inputs are about to change, which the resolver cannot know yet),
    and the keys where any is missing or stale. ([], []) when everything is fresh."""
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    hit: set[str] = set()
    where = []
    for pk in keys if keys is not None else [None]:
        found = {a for a in assets if resolver.get_status(dg.AssetKey(a), pk) != StaleStatus.FRESH}
        if found:
            hit |= found
            where.append(pk)
    chosen: list[str] = []
    for a in assets:
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey(a)).parent_keys}
        if a in hit or parents & set(chosen):
            chosen.append(a)
    return chosen, where
