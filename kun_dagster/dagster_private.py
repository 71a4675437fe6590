"""Dagster's private names this project depends on, behind one door: none has a public name in
dagster 1.13.27 (public ones, such as dg.DagsterEventType, are used as they are). Each is pinned by
tests/test_dagster_private.py to that version, so an upgrade that moves one fails there, by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

# Provenance tags Dagster writes on every materialization (the release reads what each partition
# was made under) and the tag an observation's data version is read from.
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,  # an external asset never observed, as the resolver counts it
    INPUT_DATA_VERSION_TAG_PREFIX,
    NULL_DATA_VERSION,  # an asset never made
    CachingStaleStatusResolver,  # the resolver the UI's "stale" comes from; automation/stale.py applies its rule in bulk
    StaleStatus,
    extract_data_provenance_from_entry,
    extract_data_version_from_entry,
)
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.context.metadata_logging import AssetMetadataHandle, OutputMetadataAccumulator
from dagster._core.loader import LoadingContextForTest  # the plain loader cache; Dagster names it for tests only
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.runs import SqliteRunStorage  # tells a one-machine instance

# A single-run backfill's partition range: dg.materialize takes one partition key, so a key range
# (one run per source) goes as these tags.
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

PINNED = "1.13.27"  # the Dagster version these names were checked against


def add_partition_metadata(context, metadata: Mapping[str, Mapping[str, Any]]) -> None:
    """context.add_asset_metadata(md, partition_key=k) for every partition of a run at once. The
    public call lists the run's whole key range to check each key, O(n) a call and O(n^2) a run:
    at 3,000 partitions, minutes an asset. This lists the range once, then adds to the same
    accumulator the public call does."""
    wanted = set(context.partition_keys)
    if stray := [k for k in metadata if k not in wanted]:
        raise dg.DagsterInvariantViolationError(f"metadata for partitions this run does not target: {stray[:5]}")
    step = context.get_step_execution_context()
    merged = dict(step._metadata_accumulator.per_output_metadata)  # noqa: SLF001
    for key, md in metadata.items():
        handle = AssetMetadataHandle(asset_key=context.assets_def.key, partition_key=key)
        merged[handle] = {**merged.get(handle, {}), **md}
    step._metadata_accumulator = OutputMetadataAccumulator(per_output_metadata=merged)  # noqa: SLF001


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "CODE_VERSION_TAG",
    "DATA_VERSION_TAG",
    "DEFAULT_DATA_VERSION",
    "INPUT_DATA_VERSION_TAG_PREFIX",
    "NULL_DATA_VERSION",
    "PINNED",
    "AssetCheckExecutionRecordStatus",
    "AssetKeyPartitionKey",
    "CachingStaleStatusResolver",
    "LoadingContextForTest",
    "SqliteRunStorage",
    "StaleStatus",
    "add_partition_metadata",
    "extract_data_provenance_from_entry",
    "extract_data_version_from_entry",
]
