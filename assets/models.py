"""Seed data and the models: the base, the backward label model, the forward chat model.

With no path configured, the base is the tiny demo model built here and the label and chat models
are fine-tuned from it on seed_data; with paths, the same assets fine-tune that base or register a
given checkpoint as it is. Each model asset's value is a reference {name, path, ...}.
"""

import dagster as dg
import pandas as pd

from kun_dagster import dataset, model_store, stages, storage, training
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.partitions import hive
from kun_dagster.prompts import HUMPBACK_SEED_TAG
from kun_dagster.registry import BASE_MODEL, CHAT_MODEL, DATASET, SCORED, SEED_DATA, group, in_round
from resources import TALLY, KunResource

from .common import GPU_POOL, GPU_RETRY, gpu_tags, kinds, table

MODEL_IO = "model_io_manager"  # model assets are JSON references, not frames


def _versioned(ref: dict) -> dg.Output:
    """A model reference whose data version is its content fingerprint (weights and tokenizer): a
    retrained or swapped checkpoint makes what it wrote stale; the same one re-registered does not."""
    return dg.Output(ref, data_version=dg.DataVersion(ref["fingerprint"]))


def _given(kun: KunResource, role: str, path: str) -> dg.Output:
    try:
        return _versioned(model_store.given(role, path, kun.store, kun.config.model_cache))
    except model_store.ModelError as e:
        raise dg.Failure(str(e), allow_retries=False) from e


def _trained(kun: KunResource, context: dg.AssetExecutionContext, role: str, train) -> tuple[dict, training.TrainReport]:
    c = kun.config
    return model_store.trained(role, c.models_dir, c.model_cache, context.run_id[:8], kun.store, train)


def _fine_tuned(
    kun: KunResource, context, role: str, settings, base_model: dict, examples: list, system: str | None = None, **metadata
) -> dg.Output[dict]:
    """The base fine-tuned on `examples` (models_dir/<role>), with its training figures as metadata;
    `system`: the system message the model is to be prompted with (on its reference)."""
    c = kun.config
    base = kun.local_model(base_model["path"])
    ref, report = _trained(
        kun, context, role, lambda out: training.fine_tune(base, out, examples, settings, role, c.models.keep_default_system)
    )
    context.add_output_metadata(
        {
            "examples": report.examples,
            **metadata,
            "mean_loss": report.mean_loss or 0.0,
            "seconds": report.seconds,
            "resumed_from_step": report.resumed_from_step,  # a killed fine-tuning resumed from its checkpoint (0: none)
            "base": base_model["name"],
            "loss_curve": dg.MetadataValue.json(report.loss_curve),
        }
    )
    return _versioned({**ref, "system": system} if system else ref)


def _seed_data(cfg: KunConfig) -> dg.AssetsDefinition:
    @dg.asset(group_name=group(SEED_DATA), kinds=kinds(cfg, "json", "parquet", checked=False), code_version=code_version(SEED_DATA, cfg))
    def seed_data(context: dg.AssetExecutionContext, kun: KunResource) -> dg.Output[pd.DataFrame]:
        """COIG-CQIA seed records (instruction, input, output, ...); multiple-choice items dropped
        (Kun). Config: seed."""
        c = kun.config
        uri = c.resolve(c.seed.uri)
        try:
            s = c.seed
            kept, n_mc = training.load_seeds(uri, kun.store.options(uri), s.drop_multiple_choice, s.eval_fraction, s.eval_min_output_chars)
        except ValueError as e:
            raise dg.Failure(str(e), allow_retries=False) from e
        context.add_output_metadata(
            {
                "dagster/row_count": len(kept),
                "dropped_multiple_choice": n_mc,
                "held_out": int((kept["split"] == training.EVAL).sum()),  # seed.eval_fraction: in no training set
                "source": dg.MetadataValue.path(uri),
                "preview": table(kept[["instruction", "input", "output"]]),
            }
        )
        # the seeds' content as the data version: an edited seed file makes the models trained on it
        # stale, and re-reading an unchanged one (kun run does, every time) does not
        return dg.Output(kept, data_version=dg.DataVersion(storage.content_hash([kept])))

    return seed_data


def _base_model(cfg: KunConfig) -> dg.AssetsDefinition:
    @dg.asset(
        group_name=group(BASE_MODEL),
        kinds={"pytorch"},  # torch trains it
        pool=GPU_POOL,
        retry_policy=GPU_RETRY,
        io_manager_key=MODEL_IO,
        op_tags=gpu_tags(cfg, None),
        code_version=code_version(BASE_MODEL, cfg),
    )
    def base_model(context: dg.AssetExecutionContext, kun: KunResource, seed_data: pd.DataFrame) -> dg.Output[dict]:
        """The base model: a configured checkpoint, or the tiny Qwen2 of the embedded default
        (tokenizer trained on the demo texts, short language-model pre-training). Config:
        models.base (path, tiny)."""
        c = kun.config
        if c.models.base.path:
            return _given(kun, "base", c.resolve(c.models.base.path))
        seeds = training.training_seeds(seed_data)  # the held-out seeds stay out of every training set, this one too
        texts = (
            stages.corpus_texts(c, c.models.base.tiny.pretrain_docs, kun.store) + seeds["instruction"].tolist() + seeds["output"].tolist()
        )
        ref, report = _trained(kun, context, "base", lambda out: training.build_tiny_base(texts, out, c.models.base.tiny))
        context.add_output_metadata(
            {
                "pretrain_texts": report.examples,
                "mean_loss": report.mean_loss or 0.0,
                "seconds": report.seconds,
                "loss_curve": dg.MetadataValue.json(report.loss_curve),
            }
        )
        return _versioned(ref)

    return base_model


def _role_asset(cfg: KunConfig, role: str, examples, doc: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{role}_model",
        group_name=group(f"{role}_model"),
        kinds={"pytorch"},
        pool=GPU_POOL,
        retry_policy=GPU_RETRY,
        io_manager_key=MODEL_IO,
        description=doc,
        op_tags=gpu_tags(cfg, None),
        code_version=code_version(f"{role}_model", cfg),
    )
    def _asset(context: dg.AssetExecutionContext, kun: KunResource, seed_data: pd.DataFrame, base_model: dict) -> dg.Output[dict]:
        c = kun.config
        rc = getattr(c.models, role)
        if rc.path:
            return _given(kun, role, c.resolve(rc.path))
        return _fine_tuned(kun, context, role, rc.train, base_model, examples(seed_data))

    return _asset


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    label_model = _role_asset(
        cfg,
        "label",
        lambda seeds: training.label_examples(seeds, cfg.seed.label_min_output_chars),
        "Backward model p(instruction | text): the base fine-tuned on seeds with the output as the "
        "user turn and instruction + input as the reply (loss on the reply only); or a given checkpoint. "
        "Config: models.label (path, train, engine settings), seed.label_min_output_chars.",
    )
    chat_model = _role_asset(
        cfg,
        "chat",
        training.chat_examples,
        "Forward chat model (instruction -> output on the seeds): scores instructions and polishes answers; or a given "
        "checkpoint. Config: models.chat (path, train, engine settings).",
    )
    return [_seed_data(cfg), _base_model(cfg), label_model, chat_model] + [_chat_round(cfg, k) for k in range(2, cfg.iterations + 1)]


def _chat_round(cfg: KunConfig, k: int) -> dg.AssetsDefinition:
    """Round k's chat model, Humpback's M_{k-1}: the base fine-tuned (models.chat.train) on the
    training seeds + round k-1's data, every source's: its release (round_data: release) or, as
    Humpback trains, its pairs kept by score with the raw text as the answer, under Humpback's
    system tags (round_data: segments)."""
    name, previous = in_round(CHAT_MODEL, k), in_round(DATASET, k - 1)
    segments = cfg.round_data == "segments"
    curated = in_round(SCORED, k - 1)
    everything = dg.AllPartitionMapping()

    @dg.asset(
        name=name,
        group_name=group(name),
        kinds={"pytorch"},
        pool=GPU_POOL,
        retry_policy=GPU_RETRY,
        io_manager_key=MODEL_IO,
        ins={  # every source's partitions that exist
            "released": dg.AssetIn(key=previous, partition_mapping=everything, metadata={TALLY: ["instruction", "input", "output"]}),
            **(
                {"curated": dg.AssetIn(key=curated, partition_mapping=everything, metadata={TALLY: ["instruction", "text", "score"]})}
                if segments
                else {}
            ),
            **{n: dg.AssetIn() for n in (SEED_DATA, BASE_MODEL)},
        },
        op_tags=gpu_tags(cfg, None),
        code_version=code_version(name, cfg),
        description=f"Round {k}'s chat model (Humpback's M{k - 1}): the base fine-tuned on the training seeds + "
        + (
            f"round {k - 1}'s pairs kept by score ({curated}) with the raw text as the answer, under Humpback's system tags"
            if segments
            else f"round {k - 1}'s release ({previous})"
        )
        + ", every source's; it re-scores and polishes the same labeled_pairs. Config: models.chat.train, round_data.",
    )
    def chat_round(
        context: dg.AssetExecutionContext, kun: KunResource, released, seed_data: pd.DataFrame, base_model: dict, **curated
    ) -> dg.Output[dict]:
        c = kun.config
        if segments:
            kept: dict[str, list] = {}
            for key, t in curated["curated"].items():
                kept.setdefault(hive(key)["source"], []).append(t.frame)
            kept = {s: dataset.kept_pairs(frames, c.score.threshold) for s, frames in kept.items()}
            pairs = pd.concat([pd.DataFrame({"instruction": [], "text": []}), *kept.values()], ignore_index=True)
            examples, system = training.humpback_examples(seed_data, pairs), HUMPBACK_SEED_TAG
            counts = {"segments": len(pairs), "by_source": dg.MetadataValue.json({s: len(r) for s, r in kept.items()})}
        else:
            released = {source: t.frame for source, t in released.items() if t.rows}
            records = pd.concat(list(released.values()), ignore_index=True) if released else None
            examples, system = training.chat_examples(seed_data, records), None
            counts = {
                "release_records": 0 if records is None else len(records),
                "by_source": dg.MetadataValue.json({s: len(r) for s, r in released.items()}),
            }
        return _fine_tuned(kun, context, f"chat_round{k}", c.models.chat.train, base_model, examples, system, **counts)

    return chat_round
