"""IO managers on Dagster's UPathIOManager: hive-partitioned Parquet, and JSON model references.

Partitions land at {base}/{asset}/source={s}/shard={k}/part-0.parquet and are published
atomically (kun_dagster.storage). A stage hands over a StageResult: its rows (a frame, or a file
the stage streamed into the partition's staging folder) first, then its dropped rows to
{base}/quarantine/{asset}/source=.../shard=.../, only once the whole step has succeeded; then the
staging folder (batch checkpoints) goes. A failure between the two leaves the step failed and the
partition unrecorded, so the next run writes both again. A single-run backfill hands the manager one value per partition in a dict
keyed by partition key.
"""

import json
from typing import Any

import dagster as dg
import pandas as pd
from upath import UPath

from kun_dagster import registry, schemas, storage
from kun_dagster.partitions import hive
from kun_dagster.stages import StageResult

from .kun import KunResource

STREAM = "kun/stream"  # AssetIn metadata: load the partition as record batches (storage.PartitionBatches)
ARROW = "kun/arrow"  # AssetIn metadata: load the partition as Arrow, when read (storage.PartitionTable: the dedup signatures)
# AssetIn metadata: load what the partition holds without its rows (storage.Tally: row count, quarantine
# reasons, the stats its stage recorded), plus the columns listed (ALL: every column); what was never
# published counts zero. How the release's funnel and the card read the stages: as declared inputs.
TALLY, ALL = "kun/tally", storage.ALL_COLUMNS


class _ParquetUPathIOManager(dg.UPathIOManager):
    extension = ""  # a partition is a folder of part files

    def __init__(self, base_path: UPath, batch_rows: int):
        super().__init__(base_path=base_path)
        self.batch_rows = batch_rows  # rows per batch of an input read as a stream

    def get_path_for_partition(self, context, path: UPath, partition: str) -> UPath:
        spec = registry.BY_NAME.get(registry.stage_of(context.asset_key.path[-1]))
        bands = spec is not None and spec.partitions == registry.GROUP_BAND  # group=/band=, not source=/shard=
        return storage.partition_dir(path, "", hive(partition, sep="/", bands=bands))

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame | StageResult, path: UPath) -> None:
        asset, part = "/".join(context.asset_key.path), storage.partition_of(path)
        result = obj if isinstance(obj, StageResult) else None
        rows = result.rows if result is not None else obj
        # a staged file by one rename; a frame with its dataset version's schema
        storage.publish(rows, path, schemas.arrow_schema(asset) if schemas.known(asset) else None)
        if result is not None:  # then the rows it dropped (what drops nothing has no quarantine), and its figures
            version = registry.find(asset)
            if (version is not None and version.reasons) or storage.row_count(result.dropped):
                storage.publish(result.dropped, storage.quarantine_dir(self._base_path, asset, part), schemas.QUARANTINE)
            storage.write_stats(path, result.stats)
        # published: its batch checkpoints are done
        storage.remove_tree(storage.staging_dir(self._base_path, asset, part), prune_up_to=self._base_path / storage.STAGING)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame | storage.PartitionBatches | storage.Tally:
        if (columns := context.definition_metadata.get(TALLY)) is not None:
            asset = "/".join(context.upstream_output.asset_key.path)
            quarantine = storage.quarantine_dir(self._base_path, asset, storage.partition_of(path))
            return storage.tally(path, quarantine, columns)
        try:
            if context.definition_metadata.get(STREAM):
                return storage.PartitionBatches(path, self.batch_rows)
            if context.definition_metadata.get(ARROW):
                return storage.PartitionTable(path)
            return storage.read_partition(path)
        except FileNotFoundError as e:  # e.g. one shard's signatures, which source-wide dedup needs
            raise dg.Failure(
                f"{context.upstream_output.asset_key.to_user_string()} {storage.partition_of(path)}: not materialized ({e}); "
                "materialize it first (a backfill of the whole source does)",
                allow_retries=False,
            ) from e

    def load_partitions(self, context: dg.InputContext):
        """{partition key: value}, one partition as its bare value as Dagster's own gives it, a tally
        input always as a dict. Dagster's own writes a debug line per partition into the event log:
        a third of the event rows a run over many empty shards writes."""
        paths = self._get_paths_for_partitions(context)
        keys = context.asset_partition_keys
        if len(keys) == 1 and context.definition_metadata.get(TALLY) is None:
            return self.load_from_path(context, paths[keys[0]])
        return {key: self.load_from_path(context, paths[key]) for key in keys}

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not context.has_asset_partitions:
            return super().handle_output(context, obj)
        paths = self._get_paths_for_partitions(context)
        frames = obj if isinstance(obj, dict) else {next(iter(paths)): obj}
        missing = sorted(set(paths) - set(frames))
        if missing:
            raise dg.Failure(f"{context.asset_key.to_user_string()}: no output for partitions {missing}")
        for key, path in paths.items():
            self.dump_to_path(context, frames[key], path)


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Parquet datasets under the config's base URI (a local folder or s3://bucket/prefix); a step
    whose store is down or refuses the credentials fails at its start, saying which and where."""

    kun: KunResource

    def create_io_manager(self, context) -> _ParquetUPathIOManager:
        return _ParquetUPathIOManager(base_path=self.kun.checked_base(), batch_rows=self.kun.config.storage.batch_rows)


class _JsonUPathIOManager(dg.UPathIOManager):
    extension = ".json"

    def dump_to_path(self, context, obj: dict, path: UPath) -> None:
        storage.write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"))

    def load_from_path(self, context, path: UPath) -> dict:
        try:
            with path.open("r", encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError as e:
            raise dg.Failure(
                f"{context.upstream_output.asset_key.to_user_string()}: not materialized ({path}); materialize it first",
                allow_retries=False,
            ) from e


class ReportIOManager(dg.ConfigurableIOManagerFactory):
    """Reports (the evaluation's figures) as JSON under {base}/reports/{asset}.json."""

    kun: KunResource

    def create_io_manager(self, context) -> _JsonUPathIOManager:
        return _JsonUPathIOManager(base_path=self.kun.checked_base() / storage.REPORTS)


class ModelRefIOManager(dg.ConfigurableIOManagerFactory):
    """Model assets are references (name, path local or s3://, provenance); the weights stay where they are."""

    kun: KunResource

    def create_io_manager(self, context) -> _JsonUPathIOManager:
        return _JsonUPathIOManager(base_path=self.kun.checked_base() / "models" / "refs")
