"""evaluation (one per round, with `evaluation` on): what the round's release is worth, next to it in the UI."""

from pathlib import Path

import dagster as dg

from kun_dagster import evaluation as core
from kun_dagster import registry, training
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.llm import load_engine
from kun_dagster.llm.base import EngineSpec
from kun_dagster.registry import EVALUATION, in_round
from resources import TALLY, KunResource, LLMResource

from .common import GPU_POOL, gpu_tags, table

REPORT_IO = "report_io_manager"  # the evaluation's figures: JSON under {base}/reports


def build(cfg: KunConfig, k: int) -> dg.AssetsDefinition:
    name, release = in_round(EVALUATION, k), in_round(registry.DATASET, k)

    @dg.asset(
        name=name,
        group_name=registry.group(name),
        kinds={"pytorch", "json"},
        pool=GPU_POOL,
        io_manager_key=REPORT_IO,
        ins={
            registry.DATASET: dg.AssetIn(  # every source's records that exist
                key=release, partition_mapping=dg.AllPartitionMapping(), metadata={TALLY: ["instruction", "input", "output"]}
            ),
            **{name: dg.AssetIn() for name in (registry.SEED_DATA, registry.BASE_MODEL, registry.CHAT_MODEL)},
        },
        op_tags=gpu_tags(cfg, "chat"),
        code_version=code_version(name, cfg),
        description=(
            f"Does round {k}'s release help? The base fine-tuned (models.chat.train; LoRA per evaluation.lora) on the "
            "training seeds alone and on the seeds + the release (each source's, and all together), compared on the "
            "held-out seeds (seed.eval_fraction): loss of the held-out answers, and the chat model's pairwise judgement "
            "(both orders, win rate with a bootstrap 95% interval); the dataset cards show its figures. Config: evaluation."
        ),
    )
    def evaluate(
        context: dg.AssetExecutionContext,
        kun: KunResource,
        chat_llm: LLMResource,
        instruction_dataset,
        seed_data,
        base_model: dict,
        chat_model: dict,
    ):
        c = kun.config
        releases = {source: t.frame for source, t in (instruction_dataset or {}).items() if t.rows}
        if training.heldout_seeds(seed_data).empty:
            raise dg.Failure("no held-out seeds: set seed.eval_fraction above 0 to evaluate", allow_retries=False)

        def load(path: str, model_name: str):
            return load_engine(EngineSpec(path=path, model_name=model_name, settings=c.models.chat))

        result = core.run(
            seed_data,
            releases,
            base_model,
            kun.local_model(base_model["path"]),
            c,
            Path(c.model_cache) / EVALUATION,
            load,
            lambda: chat_llm.engine(chat_model),
        )
        report = {"round": k, "heldout": result.heldout, "models": result.models, "samples": result.samples}
        numbers = {}  # plotted across runs in the UI
        for row in result.models:
            numbers[f"{row['model']}/heldout_loss"] = float(row["heldout_loss"])
            if row.get("win_rate") is not None:
                numbers[f"{row['model']}/win_rate"] = float(row["win_rate"])
        context.add_output_metadata(
            {
                "heldout_seeds": result.heldout,
                "models": table(result.frame(), rows=None, width=200),
                **numbers,
                "samples": dg.MetadataValue.json(result.samples),
            }
        )
        return report

    return evaluate
