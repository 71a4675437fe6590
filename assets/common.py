"""What every partitioned asset does around its stage: one frame per partition in, one
StageResult per partition out (rows + quarantine, published by the IO manager), per-partition
metadata for the UI."""

import uuid

import dagster as dg
import pandas as pd
import pyarrow as pa

import checks
from kun_dagster import registry, schemas, storage
from kun_dagster.corpus import CorpusError
from kun_dagster.dagster_private import add_partition_metadata
from kun_dagster.llm import EngineError, resolve_backend
from kun_dagster.llm.base import Tally
from kun_dagster.llm.checkpoint import Checkpointed
from kun_dagster.partitions import hive
from kun_dagster.stages import StageContext, StageResult
from kun_dagster.storage import FrameSink
from kun_dagster.store import is_s3
from ui import figures, table

GPU_POOL = "gpu"
# Steps whose model role runs on vLLM servers: they hold no local GPU, and this pool (default limit 1,
# like every pool: dagster.yaml) bounds how many steps of an instance share the servers at once.
SERVER_POOL = "llm_servers"
SINGLE_RUN = dg.BackfillPolicy.single_run()
# A GPU step whose process dies (OOM kill, a CUDA fault) or whose code raises is retried in the same
# run, and an LLM stage resumes from its batch checkpoints. What cannot succeed on a retry (a
# blocking check, a model that answers nothing, a missing source) fails at once: dg.Failure with
# allow_retries=False. Run-level retries (dagster.yaml) cover a dead run worker.
GPU_RETRY = dg.RetryPolicy(max_retries=2, delay=5)


def kinds(cfg, *formats: str, role: str | None = None, checked: bool = True) -> set[str]:
    """The asset's kinds in the UI: the engine it runs on (vllm or pytorch, as `backend` resolves
    here), pandera when a schema guards it, its formats, and s3 when it lives there."""
    out = set(formats)
    if role:
        out.add("pytorch" if resolve_backend(getattr(cfg.models, role).backend) == "transformers" else "vllm")
    if checked:
        out.add("pandera")
    if is_s3(cfg.base_uri):
        out.add("s3")
    return out


def on_servers(cfg, role: str | None) -> bool:
    return bool(role) and getattr(cfg.models, role).backend == "server"


def llm_pool(cfg, role: str | None) -> str:
    """The pool of a step that runs a model role: the GPU's, or the servers' where the role is on them."""
    return SERVER_POOL if on_servers(cfg, role) else GPU_POOL


def gpu_tags(cfg, role: str | None) -> dict:
    """Op tags asking Kubernetes (dagster-k8s) for the GPUs a step's engine uses: its role's vLLM
    tensor_parallel_size, one for a step that only trains, none for a role on vLLM servers; ignored
    by local executors."""
    if on_servers(cfg, role):
        return {}
    gpus = getattr(cfg.models, role).vllm.tensor_parallel_size if role else 1
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}}}


def by_partition(context: dg.AssetExecutionContext, value) -> dict[str, pd.DataFrame]:
    """An upstream input as {partition key: frame}, whether the run covers one partition or many."""
    keys = context.partition_keys
    if isinstance(value, dict):
        return {k: value[k] for k in keys}
    return {keys[0]: value}


def run_stage(
    context: dg.AssetExecutionContext,
    kun,
    asset: str,
    inputs: dict,
    stage,
    *,
    engine=None,
    tokenizer=None,
    stream: bool = False,
    side: dict[str, dict] | None = None,
    checked: bool = True,
):
    """The one driver of the partitioned stages: `stage(rows, StageContext)` on each partition of
    the run (`inputs`: partition key -> its rows; `side`: other inputs by asset, by key), its result
    reported; then the asset's checks, its output yielded only if the schema holds (`checked`).
    `engine`: the stage's model, checkpointed per batch and partition; `stream`: rows (and the
    ingest's quarantine) written into the partition's staging folder as they come. A model that
    fails or a source that cannot be read fails the step at once: nothing of the run is published."""
    tally = Tally(engine) if engine is not None else None
    out, metadata = {}, {}
    for key, rows in inputs.items():
        ctx = StageContext(
            kun.config,
            engine=checkpointed(kun, asset, key, tally) if tally is not None else None,
            tokenizer=tokenizer,
            sink=staged_sink(kun, asset, key) if stream else FrameSink(),
            quarantine=staged_sink(kun, asset, key, quarantine=True) if stream else FrameSink(),
            partition=hive(key),
            inputs={name: by_key[key] for name, by_key in (side or {}).items()},
            store=kun.store,
        )
        try:
            result = stage(rows, ctx)
        except (EngineError, CorpusError) as e:
            raise dg.Failure(f"{asset} {key}: {e}", allow_retries=False) from e
        out[key], metadata[key] = result, report_stage(context, kun, asset, key, result, ctx.engine)
    add_partition_metadata(context, metadata)
    try:
        if tally is not None:
            tally.require_text(asset)  # a model that answered nothing in the whole step failed
    except EngineError as e:
        raise dg.Failure(str(e), allow_retries=False) from e
    if not checked:
        yield dg.Output(out)
        return
    yield from checks.gate(context, kun, asset, out)


def checkpointed(kun, asset: str, key, engine) -> Checkpointed:
    """The engine with per-batch checkpoints under the partition's staging folder: a rerun after a
    crash resumes at the last finished batch (the IO manager clears the folder on publish)."""
    part = hive(key)
    return Checkpointed(
        engine,
        storage.staging_dir(kun.base, asset, part),
        kun.config.storage.checkpoint_rows,
        label=f"{asset} {part['source']}/{part['shard']}",
    )


def staged_sink(kun, asset: str, key, quarantine: bool = False) -> storage.ParquetSink:
    """A sink that streams the partition's rows (or its quarantine rows) into a file in its staging
    folder; the IO manager publishes it with one rename once the step has succeeded."""
    what, schema = ("quarantine", schemas.QUARANTINE) if quarantine else ("rows", schemas.arrow_schema(asset))
    return storage.ParquetSink(storage.staging_dir(kun.base, asset, hive(key)) / f"{what}-{uuid.uuid4().hex[:12]}.parquet", schema)


def columns(asset: str) -> dict:
    """The asset's columns as definition metadata (the UI's Columns tab), where its schema is
    declared: not repeated in each partition's materialization, where 3,000 copies of it made most
    of what a run writes to the event log and every status read parses."""
    return {"dagster/column_schema": schema_of(schemas.arrow_schema(asset))} if schemas.known(asset) else {}


def schema_of(df: pd.DataFrame | pa.Schema) -> dg.TableSchema:
    schema = df if isinstance(df, pa.Schema) else storage.to_table(df).schema
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


# What the first column of a stage figure map holds (the histogram also gets bars).
_FIGURE_KEYS = {"dropped": "reason", "histogram": "score"}


def _flat(stats: dict) -> dict:
    """Stage stats as UI metadata: numbers stay numbers (plotted across runs), figure maps become
    tables (dropped rows by reason, token and length summaries, the score histogram)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, bool) or v is None:
            out[k] = dg.MetadataValue.text(str(v))
        elif isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict) and not v:
            continue  # no rows dropped, no tokens counted: an empty table says nothing
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = figures(v, _FIGURE_KEYS.get(k, "statistic"), "rows" if k in _FIGURE_KEYS else k, bars=k == "histogram")
        else:
            out[k] = dg.MetadataValue.json(v)
    return out


def report_stage(context: dg.AssetExecutionContext, kun, asset: str, key: str, result: StageResult, engine=None) -> dict:
    """Log the partition's quarantine and return its metadata, which the step attaches for all its
    partitions at once (add_partition_metadata); the IO manager then publishes the rows and the
    quarantine together, after the whole step has succeeded."""
    part = hive(key, bands=registry.spec(asset).partitions == registry.GROUP_BAND)
    qdir = storage.quarantine_dir(kun.base, asset, part)
    n_dropped = storage.row_count(result.dropped)
    for reason, (n, sample) in storage.by_reason(result.dropped).items():
        context.log.warning(
            f"{asset} {'/'.join(part.values())}: quarantined {n} row(s) as {reason}, e.g. "
            f"file {sample['file']} row {sample['row']}: {sample['detail']}"
        )
    rows = result.rows
    head = storage.preview(rows)
    md = {
        "dagster/row_count": storage.row_count(rows),
        **({} if schemas.known(asset) else {"dagster/column_schema": schema_of(storage.columns(rows))}),
        "path": dg.MetadataValue.path(str(storage.partition_dir(kun.base, asset, part))),
        **_flat(result.stats),
    }
    if registry.find(asset) is not None:  # a dataset version has a quarantine; the dedup indices drop nothing
        md.update({"quarantine_path": dg.MetadataValue.path(str(qdir)), "quarantined": n_dropped})
    if engine is not None:  # which engine wrote these rows: vllm or transformers, and the model
        md["engine"] = f"{engine.backend}: {engine.model_name}"
        md.update(getattr(engine, "stats", {}))  # checkpoint batches reused / computed
    if len(head):
        md["preview"] = table(head)
    # no log line per partition: its materialization shows these counts, and a run over a thousand
    # partitions would write a thousand more event-log rows
    return md
