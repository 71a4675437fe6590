"""evaluation (one per round, with `evaluation` on): what the round's release is worth, next to it in the UI."""

import os
from pathlib import Path

import dagster as dg

from kun_dagster import benchmarks, registry, training
from kun_dagster import evaluation as core
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.llm import load_engine
from kun_dagster.llm.base import EngineError, EngineSpec
from kun_dagster.registry import EVALUATION, in_round
from kun_dagster.secrets import mask_uris
from resources import TALLY, KunResource

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
            "held-out seeds (seed.eval_fraction: answers only, near-duplicates together): loss of the held-out answers "
            "(fit to the seeds), and an independent judge's pairwise judgement (evaluation.judge; both orders, win rate "
            "with a bootstrap 95% interval, undetermined where most verdicts are ties; no judge, no win rate). The "
            "seeds-only model is the chat model where it was trained so. With evaluation.benchmarks, lm-evaluation-harness "
            "tasks (C-Eval, CMMLU, ...) from local disk on each model. The dataset cards show its figures. Config: evaluation."
        ),
    )
    def evaluate(
        context: dg.AssetExecutionContext,
        kun: KunResource,
        instruction_dataset,
        seed_data,
        base_model: dict,
        chat_model: dict,
    ):
        c = kun.config
        releases = {source: t.frame for source, t in (instruction_dataset or {}).items() if t.rows}
        if training.heldout_seeds(seed_data).empty:
            raise dg.Failure("no held-out seeds: set seed.eval_fraction above 0 to evaluate", allow_retries=False)

        # the models it compares are trained here, so they run here: never on the chat role's servers
        local = c.models.chat if c.models.chat.backend != "server" else c.models.chat.model_copy(update={"backend": "auto"})

        def load(path: str, model_name: str):
            return load_engine(EngineSpec(path=path, model_name=model_name, settings=local))

        base_dir = kun.local_model(base_model["path"])
        try:
            result = core.run(
                seed_data,
                releases,
                base_model,
                base_dir,
                c,
                Path(c.model_cache) / EVALUATION,
                load,
                _judge(kun, load),
                _seeds_only(kun, chat_model, base_dir),
            )
        except (core.EvaluationError, EngineError, benchmarks.BenchmarkError) as e:
            raise dg.Failure(str(e), allow_retries=False) from e
        context.add_output_metadata(_metadata(result))
        return {"round": k, "heldout": result.heldout, "judge": result.judge, "models": result.models, "samples": result.samples}

    return evaluate


def _metadata(result: core.Result) -> dict:
    """The evaluation's page: its table, and each figure as a number plotted across runs."""
    numbers = {}
    for row in result.models:
        numbers[f"{row['model']}/heldout_loss"] = float(row["heldout_loss"])
        if row.get("win_rate") is not None:
            numbers[f"{row['model']}/win_rate"] = float(row["win_rate"])
        for task, got in (row.get("benchmarks") or {}).items():
            numbers.update({f"{row['model']}/{task}/{m}": float(v) for m, v in got.items() if m in benchmarks.METRICS})
    return {
        "heldout_seeds": result.heldout,
        "judge": result.judge or "none: no win rate (evaluation.judge)",
        "models": table(result.frame(), rows=None, width=200),
        **numbers,
        "samples": dg.MetadataValue.json(result.samples),
    }


def _judge(kun: KunResource, load) -> core.Judge | None:
    """evaluation.judge as the core takes it: a checkpoint opened with the chat role's engine
    settings, or an endpoint (its key from the environment); None when none is configured."""
    j = kun.config.evaluation.judge
    if j.path:
        local = kun.local_model(j.path)
        return core.Judge(j.path, local, lambda: load(local, "judge"))
    if j.endpoint:
        return core.Judge(
            f"{j.model} at {mask_uris(j.endpoint)}",
            None,
            lambda: core.EndpointJudge(j.endpoint, j.model, os.environ.get(j.api_key_env), j.timeout),
        )
    return None


def _seeds_only(kun: KunResource, chat_model: dict, base_dir: str) -> str | None:
    """The chat model's checkpoint where it is the seeds-only model the evaluation would train:
    fine-tuned here from this base on the training seeds, with the evaluation's settings."""
    c = kun.config
    same = core.train_settings(c, base_dir) == c.models.chat.train and not chat_model.get("system")
    return kun.local_model(chat_model["path"]) if chat_model.get("origin") == "trained" and same else None
