"""The Dagster UI workflow in a real browser. `dagster dev` (webserver, daemon, code server) runs on
loopback over the embedded default; headless Chromium (Debian's package, driven by Playwright)
opens the asset graph, materializes one partition, launches a one-source backfill that the daemon
runs, waits for success on the pages, and reads check results and partition metadata off them. The
daemon's sensor posts the failed checks to a local webhook. Screenshots go to $KUN_SCREENSHOTS
(default: the test's tmp folder).

CI installs chromium and playwright and sets KUN_REQUIRE_BROWSER=1, so there a missing browser
fails instead of skipping.
"""

import os
import shutil
import urllib.parse
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.execution.backfill import BulkActionStatus  # not exported at the top level

from kun_dagster import storage
from kun_dagster.definitions import build_definitions
from kun_dagster.store import upath

from .conftest import CORPUS, MODELS, REPO, dagster_dev, free_port, given_models, graphql, location_loaded, wait_for, write_config
from .fakes import Receiver

CHROMIUM = os.environ.get("KUN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if os.environ.get("KUN_REQUIRE_BROWSER") == "1":
    from playwright.sync_api import expect, sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM}: apt-get install chromium, or set KUN_CHROMIUM"
else:
    expect = pytest.importorskip("playwright.sync_api").expect
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow
expect.set_options(timeout=30_000)  # pages on 2 busy cores
# Root in a container: no sandbox; a closed network: no background connections to refuse.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT = 600  # seconds for a run or a backfill on 2 CPU cores (a one-source backfill takes ~2 minutes)


class UI:
    """The browser page on `dagster dev`, the instance behind it, and the webhook its sensors post to."""

    def __init__(self, page, url: str, instance: dg.DagsterInstance, hook: Receiver, log: Path, shots: Path, base, cfg: Path):
        self.page, self.url, self.instance, self.hook, self.log, self.shots, self.base = page, url, instance, hook, log, shots, base
        self.cfg = cfg
        self.n = 0

    def goto(self, path: str) -> None:
        self.page.goto(self.url + path)

    def shot(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.shots / f"{self.n:02d}-{name}.png"), full_page=True)

    def pick(self, dialog, nth: int, values: list[str]) -> None:
        """Choose partitions in the launch dialog's nth dimension selector (a popover of checkboxes)."""
        dialog.locator("[aria-haspopup=dialog]").nth(nth).click()
        for v in values:
            self.page.locator(f'[role=menuitem] [title="{v}"]').click()
        dialog.get_by_text("Launch runs to materialize").click()  # closes the popover, keeps the dialog

    def finished_run(self, filters: dg.RunsFilter) -> dg.DagsterRun:
        def done():
            runs = self.instance.get_runs(filters=filters, limit=1)
            return runs[0] if runs and runs[0].is_finished else None

        return wait_for(f"a finished run ({filters})", done, RUN_TIMEOUT, self.log)


@pytest.fixture(scope="module")
def ui(models_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    # The session's trained models as given checkpoints; polished_pairs' retention bound [0.99, 1]: the
    # tiny models' answers mostly fall to the output filters, so that WARN check fails and the sensor
    # has a failure to alert on (whatever the answers say, unlike faithfulness, which they may pass).
    cfg = write_config(tmp, **given_models(models_run), **{"checks.retention": {"polished_pairs": [0.99, 1.0]}})
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # as `kun demo` sets it up: gpu pool, run queue, retries
    defs = build_definitions(cfg)
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the model assets register the given checkpoints (seconds)
        assert dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance).success

    hook, port = Receiver(), free_port()
    url = f"http://127.0.0.1:{port}"
    shots = Path(os.environ.get("KUN_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    log = tmp / "dagster-dev.log"
    env = {"DAGSTER_HOME": str(home), "KUN_CONFIG": str(cfg), "KUN_ALERT_WEBHOOK": hook.url, "KUN_UI_URL": url}
    try:
        with dagster_dev(env, log, port):
            # The check sensor's first tick starts alerting from the newest check result: let it tick before anything runs.
            wait_for("the check sensor's first tick", lambda: "check_failure_alerts skipped: started" in log.read_text(), 120, log)
            graphql(url, "mutation { setNuxSeen }")  # no "join the community" dialog popping up over the test's dialogs
            with dg.DagsterInstance.from_config(str(home)) as instance, sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(60_000)
                yield UI(page, url, instance, hook, log, shots, upath(str(tmp / "data")), cfg)
                browser.close()
    finally:
        hook.shutdown()


def test_the_asset_graph_shows_groups_kinds_descriptions_owners_and_partitions(ui):
    ui.goto("/asset-groups")
    for group in ("corpus", "dataset", "models", "pairs"):
        expect(ui.page.get_by_text(group, exact=True).first).to_be_visible()
    ui.shot("asset-graph")
    ui.goto("/locations/kun/asset-groups/pairs")
    for asset in ("labeled_pairs", "scored_pairs", "polished_pairs"):
        expect(ui.page.get_by_text(asset, exact=True).first).to_be_visible()
    for kind in ("PyTorch", "Parquet", "Pandera"):  # the test config runs the transformers engine: pytorch
        expect(ui.page.get_by_text(kind, exact=True)).to_have_count(3)
    expect(ui.page.get_by_text("Loading...")).to_have_count(0)  # each node's partition counts
    ui.shot("pairs-group")
    ui.goto("/assets/labeled_pairs")
    expect(ui.page.get_by_text("the instruction each text answers", exact=False).first).to_be_visible()  # the docstring
    expect(ui.page.get_by_text("kun-data").first).to_be_visible()  # owner team:kun-data
    expect(ui.page.get_by_text("pairs", exact=True).first).to_be_visible()  # its group
    ui.shot("labeled-pairs")
    ui.goto("/assets/labeled_pairs?view=partitions")  # source x shard: 3 x 2
    expect(ui.page.get_by_text("6 Partitions", exact=False).first).to_be_visible()
    for label in ("wudao", "wanjuan", "skypile", "0", "1"):
        expect(ui.page.get_by_text(label, exact=True).first).to_be_visible()
    ui.shot("labeled-pairs-partitions")


def test_one_partition_materialized_from_the_ui(ui):
    ui.goto("/assets/raw_corpus")
    ui.page.get_by_role("button", name="Materialize…").click()
    dialog = ui.page.get_by_role("dialog").filter(has_text="Launch runs to materialize raw_corpus")
    ui.pick(dialog, 0, ["wudao"])
    ui.pick(dialog, 1, ["0"])
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    ui.shot("launch-one-partition")
    dialog.get_by_role("button", name="Launch 1 run").click()

    run = ui.finished_run(dg.RunsFilter(tags={"dagster/partition": "wudao|0"}))
    assert run.status == dg.DagsterRunStatus.SUCCESS, ui.log.read_text()[-4000:]
    assert run.tags.get("dagster/from_ui") == "true" and run.asset_selection == {dg.AssetKey("raw_corpus")}
    ui.goto(f"/runs/{run.run_id}")
    expect(ui.page.get_by_text("Success", exact=True).first).to_be_visible()
    ui.shot("one-partition-run")

    rows = storage.partition_rows(storage.partition_dir(ui.base, "raw_corpus", {"source": "wudao", "shard": "0"}))
    ui.goto("/assets/raw_corpus?view=partitions&partition=" + urllib.parse.quote("wudao|0"))
    meta = ui.page.get_by_text("dagster/row_count", exact=True).locator("xpath=ancestor::tr[1]")
    expect(meta).to_contain_text(str(rows))
    expect(ui.page.get_by_text("quarantine_path", exact=True)).to_be_visible()
    ui.shot("one-partition-metadata")


def test_a_one_source_backfill_runs_through_the_daemon_and_its_checks_read_on_the_page(ui):
    ui.goto("/asset-groups~" + urllib.parse.quote("group:corpus or group:pairs") + "/")
    ui.page.get_by_role("button", name="Materialize all…").click()
    dialog = ui.page.get_by_role("dialog").filter(has_text="Launch runs to materialize 8 assets")
    ui.pick(dialog, 0, ["skypile"])
    dialog.get_by_role("button", name="All").nth(1).click()  # every shard
    expect(dialog.get_by_text("2 partitions", exact=True)).to_be_visible()
    ui.shot("launch-backfill")
    dialog.get_by_role("button", name="Launch backfill").click()

    backfill = wait_for("the backfill to be recorded", lambda: ui.instance.get_backfills(limit=1), 60, ui.log)[0]

    def finished():
        b = ui.instance.get_backfill(backfill.backfill_id)
        return b if b.status != BulkActionStatus.REQUESTED else None

    backfill = wait_for("the backfill to finish", finished, RUN_TIMEOUT, ui.log, every=5)
    assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, ui.log.read_text()[-4000:]
    runs = ui.instance.get_runs(filters=dg.RunsFilter.for_backfill(backfill.backfill_id))
    # Single-run backfill policy: the whole source is one run that loads each model once.
    assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
    assert {k.path[0] for k in runs[0].asset_selection} == set(CORPUS)
    for asset in CORPUS:
        assert set(ui.instance.get_materialized_partitions(dg.AssetKey(asset))) >= {"skypile|0", "skypile|1"}
        assert not {k for k in ui.instance.get_materialized_partitions(dg.AssetKey(asset)) if k.startswith(("wanjuan", "wudao|1"))}
    ui.goto(f"/runs/b/{backfill.backfill_id}")
    expect(ui.page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    expect(ui.page.get_by_text("100% completed")).to_have_count(len(CORPUS))
    ui.shot("backfill")

    # Check results on polished_pairs' page, as the instance recorded them.
    keys = [
        dg.AssetCheckKey(dg.AssetKey("polished_pairs"), c)
        for c in ("schema", "keep_rate", "retention", "empty_output_rate", "duplicate_rate", "faithfulness")
    ]
    passed = {k.name: r.evaluation.passed for k, r in ui.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys).items()}
    assert len(passed) == len(keys)
    assert passed["schema"] and not passed["retention"]  # bound [0.99, 1]
    ui.goto("/assets/polished_pairs?view=checks")
    for check, ok in passed.items():  # the list on the left: each check's name, then its latest status
        item = ui.page.get_by_text(check, exact=True).first.locator("xpath=ancestor::span[1]")
        expect(item).to_contain_text("Succeeded" if ok else "Failed")
        expect(item).not_to_contain_text("Failed" if ok else "Succeeded")
    ui.page.get_by_text("retention", exact=True).first.click()
    expect(ui.page.get_by_text("by_partition", exact=True)).to_be_visible()
    expect(ui.page.get_by_role("cell", name="FAIL", exact=True).first).to_be_visible()  # the per-partition table
    ui.shot("polished-pairs-checks")

    # The stage metadata of one partition: the score histogram as a table.
    key = dg.MultiPartitionKey({"source": "skypile", "source_shard": "1"})
    md = (
        ui.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("scored_pairs"), asset_partitions=[key]), limit=1)
        .records[0]
        .asset_materialization.metadata
    )
    ui.goto("/assets/scored_pairs?view=partitions&partition=" + urllib.parse.quote("skypile|1"))
    histogram = ui.page.get_by_text("histogram", exact=True).locator("xpath=ancestor::tr[1]")
    for record in md["histogram"].records:
        expect(histogram.get_by_role("cell", name=record.data["score"], exact=True)).to_be_visible()
    ui.shot("scored-pairs-partition")

    # The daemon's sensor posts each failed check once (it ticks every 30 s).
    failed = {c for c, ok in passed.items() if not ok}
    wait_for(
        "alerts for the failed checks",
        lambda: all(any(f"polished_pairs / {c}" in b["text"] for b in ui.hook.bodies) for c in failed),
        120,
        ui.log,
    )
    assert not any("run failed" in b["text"] for b in ui.hook.bodies)


STALE = """{ assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode { staleStatus(partition: "%s")
  staleCauses(partition: "%s") { category reason } } } }"""


def test_a_changed_threshold_marks_the_polished_partitions_stale_and_says_why(ui):
    """Last in the module: it edits the config. A new score.threshold and the code location
    reloaded: the partitions the backfill polished are stale, because polished_pairs' code version
    changed; scored_pairs' stay fresh (nothing re-scores)."""
    cfg = yaml.safe_load(ui.cfg.read_text())
    cfg.setdefault("score", {})["threshold"] = 0.7  # kun.yaml leaves the section at its defaults
    ui.cfg.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    graphql(ui.url, 'mutation { reloadRepositoryLocation(repositoryLocationName: "kun") { __typename } }')

    def status(asset: str) -> dict:
        return graphql(ui.url, STALE % (asset, "skypile|0", "skypile|0"))["assetNodeOrError"]

    # the reload takes a code server restart: until then the old definitions answer (FRESH)
    wait_for(
        "polished_pairs skypile|0 to be stale",
        lambda: location_loaded(ui.url) and status("polished_pairs").get("staleStatus") == "STALE",
        180,
        ui.log,
    )
    assert status("polished_pairs")["staleCauses"] == [{"category": "CODE", "reason": "has a new code version"}]
    assert status("scored_pairs")["staleStatus"] == "FRESH"
    ui.goto("/assets/polished_pairs?view=partitions&partition=" + urllib.parse.quote("skypile|0"))
    badge = ui.page.get_by_text("Unsynced (1)", exact=True)  # the UI's word for stale, with the count of causes
    expect(badge).to_be_visible()
    badge.hover()
    expect(ui.page.get_by_text("Code version", exact=False).first).to_be_visible()  # the cause, in its popover
    ui.shot("stale-partition")
