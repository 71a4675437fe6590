"""Dagster's private names this project depends on, behind one door: none has a public name in
dagster 1.13.27 (public ones, such as dg.DagsterEventType, are used as they are). Each is pinned by
tests/test_dagster_private.py to that version, so an upgrade that moves one fails there, by name.
"""

from __future__ import annotations

# Provenance tags Dagster writes on every materialization (the release reads what each partition
# was made under) and the tag an observation's data version is read from.
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    INPUT_DATA_VERSION_TAG_PREFIX,
    CachingStaleStatusResolver,  # the resolver the UI's "stale" comes from
    StaleStatus,
)
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.loader import LoadingContextForTest  # the plain loader cache; Dagster names it for tests only
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.runs import SqliteRunStorage  # tells a one-machine instance

# A single-run backfill's partition range: dg.materialize takes one partition key, so a key range
# (one run per source) goes as these tags.
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

PINNED = "1.13.27"  # the Dagster version these names were checked against

__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "CODE_VERSION_TAG",
    "DATA_VERSION_TAG",
    "INPUT_DATA_VERSION_TAG_PREFIX",
    "PINNED",
    "AssetCheckExecutionRecordStatus",
    "AssetKeyPartitionKey",
    "CachingStaleStatusResolver",
    "LoadingContextForTest",
    "SqliteRunStorage",
    "StaleStatus",
]
