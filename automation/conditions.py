"""Declarative Automation: which assets the daemon keeps fresh (deploy.automation), and when.

The condition is Dagster's eager() with these changes: an input counts as updated when its data
version changed, not on every materialization; the asset's own code version changing counts too;
and only partitions that exist are refreshed. Dagster 1.13 records one data version per run, not
per partition, so a partition re-materialized beside a changed one looks changed too; the
data-version test stops that from cascading where it costs most. duplicate_clusters is the one
source-wide step: a new file re-clusters every shard of its source, and its data version hashes
the clusters' content, so deduped_corpus re-runs only where the clusters actually moved (not on
duplicate_clusters being requested in the same tick), and waits while the signatures it is
clustered from are being updated. Dagster requests a source-wide step only once its inputs are
done (it cannot share a run with them), so a new file takes two ticks: its shard's ingest,
filter and signatures, then the clusters with the shard's deduped_corpus. Triggered runs are backfills, so each
asset's partitions of a source run in one run (single-run backfill policy: one model load per
source), and GPU steps wait for the `gpu` pool like any other run.
"""

from __future__ import annotations

import dagster as dg

from kun_dagster.config import KunConfig
from kun_dagster.registry import AUTOMATED, AWAITS, stage_of

AC = dg.AutomationCondition


def fresh(across: tuple[str, ...] = ()) -> dg.AutomationCondition:
    """eager(), where an input is updated when its data version changed (or it is requested on this
    tick, except from the inputs `across`, which are awaited instead), or the asset's own code
    version changed (a kun.yaml key that shapes it); on partitions that exist. A partition never
    made is the user's to make first (or it is new: a source added), as with eager(): a fresh
    instance's first observation of the sources starts nothing."""
    new_version = AC.any_deps_match((AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new data version"))
    requested = AC.any_deps_match(AC.will_be_requested())
    if across:
        requested = requested.ignore(dg.AssetSelection.assets(*across))
    updated = (new_version | requested).with_label("an input has new data")
    changed = ((updated | AC.code_version_changed()) & ~AC.missing()).with_label("made, and changed since")
    cond = (AC.newly_missing() | changed).since_last_handled() & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()
    if across:  # ... and waits while what those inputs are made from is being updated (they follow on a later tick)
        upstream_moving = AC.any_deps_match(AC.will_be_requested() | AC.in_progress()).with_label("its inputs are being updated")
        cond = cond & ~AC.any_deps_match(upstream_moving).allow(dg.AssetSelection.assets(*across))
    return cond.with_label("fresh")


def condition(asset: str) -> dg.AutomationCondition:
    return fresh(across=AWAITS.get(asset, ()))


def apply_automation(assets: list, cfg: KunConfig) -> list:
    """The assets, those that deploy.automation names with their condition."""
    names = set(AUTOMATED[cfg.deploy.automation])
    return dg.map_asset_specs(
        lambda spec: (
            spec.replace_attributes(automation_condition=condition(spec.key.path[-1]))
            if stage_of(spec.key.path[-1]) in names  # a later round's stages as round 1's; the evaluation is never automated
            else spec
        ),
        assets,
    )


def automation_sensors(cfg: KunConfig) -> list[dg.AutomationConditionSensorDefinition]:
    """The daemon's automation sensor, ticking at least as often as the sources are observed; none
    when automation is off."""
    if cfg.deploy.automation == "off":
        return []
    return [
        dg.AutomationConditionSensorDefinition(
            "kun_automation",
            target=dg.AssetSelection.all(),
            minimum_interval_seconds=min(30, cfg.deploy.observe_interval),
            default_status=dg.DefaultSensorStatus.RUNNING,
            emit_backfills=True,
            description=f"deploy.automation: {cfg.deploy.automation}: materializes what went stale, one backfill per tick",
        )
    ]
