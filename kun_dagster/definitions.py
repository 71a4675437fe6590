"""The composition root: dg.Definitions built from the config ($KUN_CONFIG or ./kun.yaml)."""

from __future__ import annotations

import os
import warnings

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from assets import corpus, dataset, dedup, evaluation, jobs, models, pairs
from automation import apply_automation, automation_sensors, observe_sources, source_files
from checks import check_failure_alerts, dead_run_recovery, run_failure_alerts
from resources import KunResource, LLMResource, ModelRefIOManager, ParquetIOManager, ReportIOManager

from .config import config_path, fingerprint, read_config


def build_definitions(path: str | os.PathLike | None = None) -> dg.Definitions:
    cfg_file = config_path(path)
    version = fingerprint(cfg_file)
    cfg = read_config(cfg_file)
    s3 = cfg.storage.s3
    secrets = {
        field: dg.EnvVar(name)
        for field, name in (
            ("s3_access_key_id", s3.access_key_id_env),
            ("s3_secret_access_key", s3.secret_access_key_env),
            ("s3_session_token", s3.session_token_env),
        )
        if os.environ.get(name)
    }
    kun = KunResource(config_path=str(cfg_file), config_version=version, **secrets)  # read once, by both
    llm = {f"{role}_llm": LLMResource(kun=kun, role=role) for role in ("base", "label", "chat")}
    all_assets = [source_files(cfg)] + models.build(cfg) + corpus.build(cfg) + dedup.build(cfg) + pairs.build(cfg) + dataset.build(cfg)
    all_assets = dg.map_asset_specs(lambda spec: spec.replace_attributes(owners=cfg.deploy.owners), all_assets)
    all_assets = apply_automation(all_assets, cfg)
    # Each step in its own process, forked from a server that has imported this code location once
    # per run instead of spawned (which re-imports Dagster and the code location): 0.9-1.0 s from
    # launch to a running step (docs/ARCHITECTURE.md). Nothing here touches CUDA before a step runs.
    executor = dg.multiprocess_executor.configured({"start_method": {"forkserver": {}}})
    if cfg.deploy.executor == "k8s":  # one Kubernetes job per step; GPU steps request GPUs via op tags
        from dagster_k8s import k8s_job_executor

        executor = k8s_job_executor.configured(cfg.deploy.k8s) if cfg.deploy.k8s else k8s_job_executor
    return dg.Definitions(
        assets=all_assets,
        resources={
            "kun": kun,
            "io_manager": ParquetIOManager(kun=kun),
            models.MODEL_IO: ModelRefIOManager(kun=kun),
            evaluation.REPORT_IO: ReportIOManager(kun=kun),
            **llm,
        },
        jobs=jobs.build(cfg),
        sensors=[check_failure_alerts, run_failure_alerts, dead_run_recovery, observe_sources(cfg), *automation_sensors(cfg)],
        executor=executor,
    )


defs = build_definitions()
