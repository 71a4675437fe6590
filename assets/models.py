"""Seed data and the models: the base, the backward label model, the forward chat model.

With no path configured, the base is the tiny demo model built here and the label and chat models
are fine-tuned from it on seed_data; with paths, the same assets fine-tune that base or register a
given checkpoint as it is. Each model asset's value is a reference {name, path, ...}.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from kun_dagster import model_store, stages, storage, training
from kun_dagster.config import KunConfig
from resources import KunResource

from .common import GPU_POOL, GPU_RETRY, gpu_tags, kinds, table

GROUP = "models"
MODEL_IO = "model_io_manager"  # model assets are JSON references, not frames


def _ref(role: str, path: str, local: str, origin: str) -> dict:
    """A model asset's value: where the checkpoint is (local folder or remote URI) and its card."""
    card = Path(local) / model_store.MODEL_CARD
    return {
        "role": role,
        "name": f"{Path(path.rstrip('/')).name}" if origin == "given" else f"kun-{role}",
        "path": path if storage.is_remote(path) else str(Path(path).resolve()),
        "origin": origin,
        "fingerprint": model_store.fingerprint(local),  # the weights' and tokenizer's content
        "card": json.loads(card.read_text()) if card.exists() else {},
    }


def _given(kun: KunResource, role: str, path: str) -> dict:
    if not (kun.store.path(path) / "config.json").is_file():
        raise dg.Failure(f"{role} model path {path} is not a transformers checkpoint (no config.json)", allow_retries=False)
    return _ref(role, path, kun.local_model(path), "given")


def _trained(kun: KunResource, context: dg.AssetExecutionContext, role: str, train) -> tuple[dict, training.TrainReport]:
    """Train into a local folder (models_dir itself when local), then publish to a versioned folder
    under a remote models_dir; the reference names wherever the checkpoint now lives."""
    c = kun.config
    remote = storage.is_remote(c.models_dir)
    local = Path(c.model_cache) / "trained" / f"{role}-{context.run_id[:8]}" if remote else Path(c.models_dir) / role
    report = train(local)
    path = model_store.publish(report.path, f"{c.models_dir}/{role}/{context.run_id[:8]}", kun.store) if remote else report.path
    return _ref(role, path, report.path, "tiny" if role == "base" else "trained"), report


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    @dg.asset(group_name=GROUP, kinds=kinds(cfg, "json", "parquet", checked=False))
    def seed_data(context: dg.AssetExecutionContext, kun: KunResource) -> pd.DataFrame:
        """COIG-CQIA seed records (instruction, input, output, ...); multiple-choice items dropped (Kun)."""
        c = kun.config
        uri = c.resolve(c.seed.uri)
        seeds = pd.read_json(uri, lines=True, dtype=False, storage_options=kun.store.options(uri) or None)  # None for a local seed
        missing = {"instruction", "output"} - set(seeds.columns)
        if missing:
            raise dg.Failure(f"seed file {uri} lacks fields {sorted(missing)}", allow_retries=False)
        seeds["input"] = seeds.get("input", pd.Series([""] * len(seeds))).fillna("").astype(str)
        mc = seeds["input"].map(training.is_multiple_choice) if c.seed.drop_multiple_choice else pd.Series(False, index=seeds.index)
        kept = seeds[~mc].reset_index(drop=True)
        context.add_output_metadata(
            {
                "dagster/row_count": len(kept),
                "dropped_multiple_choice": int(mc.sum()),
                "source": dg.MetadataValue.path(uri),
                "preview": table(kept[["instruction", "input", "output"]]),
            }
        )
        return kept

    @dg.asset(group_name=GROUP, kinds={"pytorch"}, pool=GPU_POOL, retry_policy=GPU_RETRY, io_manager_key=MODEL_IO, op_tags=gpu_tags(cfg, None))  # torch trains it
    def base_model(context: dg.AssetExecutionContext, kun: KunResource, seed_data: pd.DataFrame) -> dict:
        """The base model: a configured checkpoint, or the tiny Qwen2 of the embedded default
        (tokenizer trained on the demo texts, short language-model pre-training)."""
        c = kun.config
        if c.models.base.path:
            return _given(kun, "base", c.resolve(c.models.base.path))
        texts = stages.corpus_texts(c, 20000, kun.store) + seed_data["instruction"].tolist() + seed_data["output"].tolist()
        ref, report = _trained(kun, context, "base", lambda out: training.build_tiny_base(texts, out, c.models.base.tiny))
        context.add_output_metadata(
            {
                "pretrain_texts": report.examples,
                "mean_loss": report.mean_loss or 0.0,
                "seconds": report.seconds,
                "loss_curve": dg.MetadataValue.json(report.loss_curve),
            }
        )
        return ref

    def _role_asset(role: str, examples, doc: str):
        @dg.asset(name=f"{role}_model", group_name=GROUP, kinds={"pytorch"}, pool=GPU_POOL, retry_policy=GPU_RETRY, io_manager_key=MODEL_IO,
                  description=doc,
                  op_tags=gpu_tags(cfg, None))
        def _asset(context: dg.AssetExecutionContext, kun: KunResource, seed_data: pd.DataFrame, base_model: dict) -> dict:
            c = kun.config
            rc = getattr(c.models, role)
            if rc.path:
                return _given(kun, role, c.resolve(rc.path))
            base = kun.local_model(base_model["path"])
            ref, report = _trained(kun, context, role, lambda out: training.fine_tune(base, out, examples(seed_data), rc.train, role,
                                                                                    c.models.keep_default_system))
            context.add_output_metadata(
                {
                    "examples": report.examples,
                    "mean_loss": report.mean_loss or 0.0,
                    "seconds": report.seconds,
                    "base": base_model["name"],
                    "loss_curve": dg.MetadataValue.json(report.loss_curve),
                }
            )
            return ref

        return _asset

    label_model = _role_asset(
        "label",
        lambda seeds: training.label_examples(seeds, cfg.seed.label_min_output_chars),
        "Backward model p(instruction | text): the base fine-tuned on seeds with the output as the "
        "user turn and instruction + input as the reply (loss on the reply only); or a given checkpoint.",
    )
    chat_model = _role_asset(
        "chat",
        training.chat_examples,
        "Forward chat model (instruction -> output on the seeds): scores instructions and polishes answers; or a given checkpoint.",
    )
    return [seed_data, base_model, label_model, chat_model]
