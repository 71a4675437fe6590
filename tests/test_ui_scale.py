"""The UI at a production shard count: 3 sources x 1,000 shards under `dagster dev`. In headless
Chromium, a one-source backfill of raw_corpus (1,000 partitions) is launched from the asset's page,
the daemon runs it as one run (single-run backfill policy), and the backfill's status page shows it
complete. What each step took is printed (bench/README.md, "Scale").
"""

import time
import urllib.parse

import dagster as dg
import pytest
from dagster._core.execution.backfill import BulkActionStatus  # not exported at the top level

from kun_dagster.definitions import build_definitions

from .conftest import MODELS, dagster_dev, free_port, given_models, graphql, wait_for, write_config
from .postgres import instance_yaml
from .test_ui import CHROMIUM, CHROMIUM_ARGS, UI, expect, sync_playwright

pytestmark = pytest.mark.slow
SHARDS = 1000


@pytest.fixture(scope="module")
def ui(models_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui_scale")
    cfg = write_config(tmp, shards=SHARDS, **given_models(models_run))
    home = tmp / "dagster_home"
    instance_yaml(home, None)
    defs = build_definitions(cfg)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance).success
    port, log = free_port(), tmp / "dagster-dev.log"
    url = f"http://127.0.0.1:{port}"
    with (
        dagster_dev({"DAGSTER_HOME": str(home), "KUN_CONFIG": str(cfg)}, log, port),
        dg.DagsterInstance.from_config(str(home)) as instance,
        sync_playwright() as p,
    ):
        graphql(url, "mutation { setNuxSeen }")
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        yield UI(page, url, instance, None, log, tmp, None, cfg)
        browser.close()


def test_a_backfill_of_one_source_of_a_thousand_shards_launches_runs_and_reads(ui):
    took = {}
    t0 = time.perf_counter()
    ui.goto("/assets/raw_corpus")
    ui.page.get_by_role("button", name="Materialize…").click()
    dialog = ui.page.get_by_role("dialog").filter(has_text="Launch runs to materialize raw_corpus")
    ui.pick(dialog, 0, ["wudao"])
    dialog.get_by_role("button", name="All").nth(1).click()  # every shard
    expect(dialog.get_by_text(f"{SHARDS:,} partitions", exact=True)).to_be_visible()
    took["launch dialog"] = time.perf_counter() - t0
    ui.shot("launch-backfill-1000")
    t0 = time.perf_counter()
    dialog.get_by_role("button", name="Launch backfill").click()
    backfill = wait_for("the backfill to be recorded", lambda: ui.instance.get_backfills(limit=1), 60, ui.log, every=0.5)[0]
    took["launch"] = time.perf_counter() - t0

    def finished():
        b = ui.instance.get_backfill(backfill.backfill_id)
        return b if b.status != BulkActionStatus.REQUESTED else None

    backfill = wait_for("the backfill to finish", finished, 600, ui.log, every=2)
    took["backfill run"] = time.perf_counter() - t0
    assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, ui.log.read_text()[-4000:]
    runs = ui.instance.get_runs(filters=dg.RunsFilter.for_backfill(backfill.backfill_id))
    assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS  # one run for the source's 1,000 shards
    done = set(ui.instance.get_materialized_partitions(dg.AssetKey("raw_corpus")))
    assert len(done) == SHARDS and all(k.startswith("wudao|") for k in done)

    t0 = time.perf_counter()
    ui.goto(f"/runs/b/{backfill.backfill_id}")
    expect(ui.page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    expect(ui.page.get_by_text("100% completed")).to_have_count(1)
    took["status page"] = time.perf_counter() - t0
    ui.shot("backfill-1000")
    t0 = time.perf_counter()
    ui.goto("/assets/raw_corpus?view=partitions&partition=" + urllib.parse.quote("wudao|999"))
    expect(ui.page.get_by_text(f"{3 * SHARDS:,} Partitions", exact=False).first).to_be_visible()
    took["partitions page"] = time.perf_counter() - t0
    print("ui at 3 x 1,000 shards, seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in took.items()))
