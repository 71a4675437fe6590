"""The step groups as declared jobs (registry.STEPS): what `kun run` makes together, shown in the
UI, where each can be launched or backfilled on its own (one source's clusters, say)."""

import dagster as dg

from kun_dagster import dedup, registry
from kun_dagster.config import KunConfig


def build(cfg: KunConfig) -> list:
    return [
        dg.define_asset_job(
            job.name,
            selection=dg.AssetSelection.assets(*job.assets),
            description=job.step.what + (f" (round {job.round})" if job.round > 1 else ""),
        )
        for job in registry.jobs(cfg.iterations, cfg.evaluation.enabled, dedup.band_steps(cfg))
    ]
