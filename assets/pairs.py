"""labeled_pairs (label model), scored_pairs (chat model, instruction only), polished_pairs (answer polishment)."""

import dagster as dg

import checks
from kun_dagster import registry, stages
from kun_dagster.code_versions import code_version
from kun_dagster.config import KunConfig
from kun_dagster.registry import CHAT_MODEL, in_round
from resources import KunResource, LLMResource

from .common import GPU_RETRY, SINGLE_RUN, by_partition, columns, gpu_tags, kinds, llm_pool, run_stage
from .partitions import corpus_partitions


def build(cfg: KunConfig) -> list[dg.AssetsDefinition]:
    parts = corpus_partitions(cfg)

    def spec(name: str, role: str, k: int) -> dict:
        """What the three LLM stages share; output_required=False: a failed schema check publishes
        nothing (checks.gate)."""
        return dict(
            name=name,
            group_name=registry.group(name),
            partitions_def=parts,
            backfill_policy=SINGLE_RUN,
            pool=llm_pool(cfg, role),
            retry_policy=GPU_RETRY,
            output_required=False,
            check_specs=checks.specs(name),
            kinds=kinds(cfg, "parquet", role=role),
            op_tags=gpu_tags(cfg, role),
            code_version=code_version(name, cfg),
            metadata=columns(name),
        )

    @dg.asset(**spec(registry.LABELED, "label", 1))
    def labeled_pairs(context: dg.AssetExecutionContext, kun: KunResource, label_llm: LLMResource, deduped_corpus, label_model: dict):
        """The label model writes the instruction each text answers (Kun's label prompt), kept as
        written; instructions holding a banned keyword are quarantined. Config: label, sampling."""
        yield from run_stage(
            context, kun, registry.LABELED, by_partition(context, deduped_corpus), stages.label, engine=label_llm.engine(label_model)
        )

    return [labeled_pairs] + [a for k in range(1, cfg.iterations + 1) for a in _round(cfg, k, spec)]


def _round(cfg: KunConfig, k: int, spec) -> list[dg.AssetsDefinition]:
    """Round k's scoring and polishment: the same labeled_pairs, round k's chat model."""
    scored, polished, chat = (in_round(s, k) for s in (registry.SCORED, registry.POLISHED, CHAT_MODEL))
    chat_in = {CHAT_MODEL: dg.AssetIn(key=chat)}
    which = "the chat model" if k == 1 else f"round {k}'s chat model ({chat}: the base fine-tuned on the seeds + round {k - 1}'s release)"

    @dg.asset(
        **spec(scored, "chat", k),
        ins={registry.LABELED: dg.AssetIn(), **chat_in},
        description=(
            f"Every pair with {which}'s score of its instruction alone (config: score): by the answers' probabilities where "
            "the model answers in the format, else by generating and parsing its reply; each row names its rule. No keep "
            "flag: polished_pairs applies score.threshold, so a new threshold re-runs polish, not the scorer."
        ),
    )
    def scored_pairs(context: dg.AssetExecutionContext, kun: KunResource, chat_llm: LLMResource, labeled_pairs, chat_model: dict):
        yield from run_stage(context, kun, scored, by_partition(context, labeled_pairs), stages.score, engine=chat_llm.engine(chat_model))

    @dg.asset(
        **spec(polished, "chat", k),
        ins={registry.SCORED: dg.AssetIn(key=scored), **chat_in},
        description=(
            f"Pairs whose score reaches score.threshold, the text rewritten by {which} into an answer to the cleaned "
            "instruction (config: polish: prompt_token_budget, output filters, output dedup), then tagged from the "
            "taxonomy (config: tags)."
        ),
    )
    def polished_pairs(context: dg.AssetExecutionContext, kun: KunResource, chat_llm: LLMResource, scored_pairs, chat_model: dict):
        yield from run_stage(context, kun, polished, by_partition(context, scored_pairs), stages.polish, engine=chat_llm.engine(chat_model))

    return [scored_pairs, polished_pairs]
