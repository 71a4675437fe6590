"""Which partitions are stale, and why, over the whole graph: what the tests read to say a run left
nothing stale, or what a change will re-run.

Dagster's resolver (what the UI shows) gives each partition its own causes: "has a new code
version", "has a new dependency data version". It stops there: the partitions below a stale one
stay fresh until that one is re-materialized and its data version moves. For "what will a change
re-run" that is half the answer, so this view adds the rest: every partition downstream of a stale
one (through the graph's partition mappings) is stale too, naming the partition it waits on;
except across duplicate_clusters -> deduped_corpus, where a shard's deduped_corpus is stale only
once the re-clustered source moved its clusters (as automation treats it: registry.AWAITS).
"""

from __future__ import annotations

from collections import deque

import dagster as dg

from kun_dagster.dagster_private import AssetKeyPartitionKey, CachingStaleStatusResolver, LoadingContextForTest, StaleStatus
from kun_dagster.registry import AWAITS

# Dagster's cause texts, as the UI's words for them
CAUSES = {"has a new code version": "code version changed", "has a new dependency data version": "upstream data changed"}


def stale_partitions(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[str, dict[str | None, list[str]]]:
    """{asset: {partition key (None: unpartitioned): [reasons]}} of every stale partition: Dagster's
    own causes ("code version changed", "upstream data changed: <asset> <partition>"), then
    "upstream stale: <asset> <partition>" for everything downstream of one."""
    graph = defs.resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    found: dict[AssetKeyPartitionKey, list[str]] = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable:
            continue
        for pk in node.partitions_def.get_partition_keys() if node.partitions_def else [None]:
            if resolver.get_status(key, pk) != StaleStatus.STALE:
                continue
            reasons = []
            for cause in resolver.get_stale_causes(key, pk):
                text = CAUSES.get(cause.reason, cause.reason)
                dep = cause.dependency
                reasons.append(text if dep is None else f"{text}: {_name(dep)}")
            found[AssetKeyPartitionKey(key, pk)] = sorted(set(reasons))
    queue = deque(found)
    while queue:  # downstream of a stale partition: stale until it is re-materialized
        up = queue.popleft()
        for child in graph.get_children_partitions(up.asset_key, up.partition_key):
            if up.asset_key.to_user_string() in AWAITS.get(child.asset_key.to_user_string(), ()):
                continue  # stale once the input's content has moved (Dagster's own cause), not before
            reason = f"upstream stale: {_name(up)}"
            if child not in found:
                found[child] = [reason]
                queue.append(child)
            elif reason not in found[child] and found[child][-1].startswith("upstream stale") and len(found[child]) < 4:
                found[child].append(reason)
    out: dict[str, dict[str | None, list[str]]] = {}
    for akp in sorted(found, key=lambda a: (a.asset_key.to_user_string(), str(a.partition_key))):
        out.setdefault(akp.asset_key.to_user_string(), {})[akp.partition_key] = found[akp]
    return out


def _name(akp: AssetKeyPartitionKey) -> str:
    return akp.asset_key.to_user_string() + (f" {akp.partition_key}" if akp.partition_key else "")
