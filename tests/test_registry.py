"""The registry of dataset versions is the one place for each asset's name, schema, reason codes
and WARN checks: everything else agrees with it."""

import ast
from pathlib import Path

import dagster as dg
import pytest

from kun_dagster import corpus, registry, stages
from kun_dagster.definitions import build_definitions

from .conftest import write_config


def _codes(module) -> set[str]:
    """The reason-code constants a module defines (NAME = "name")."""
    return {v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v == k.lower()}


def test_every_reason_code_a_stage_can_write_belongs_to_a_version():
    listed = {r for v in registry.VERSIONS for r in v.reasons}
    assert registry.REASONS == listed  # every code defined is some version's, and every listed one defined
    assert _codes(stages) <= listed  # what the stages name for their callers
    assert set(registry.get(registry.RAW).reasons) == _codes(corpus)  # ingest's codes are raw_corpus's alone


def test_the_graph_the_checks_and_the_registry_name_the_same_versions(tmp_path):
    graph = build_definitions(write_config(tmp_path)).resolve_asset_graph()
    for v in registry.VERSIONS:
        node = graph.get(dg.AssetKey(v.name))
        checks = [k.name for k in node.check_keys]
        assert sorted(checks) == sorted(["schema", *(c.name for c in v.checks)]), v.name
        assert len({c.name for c in v.checks}) == len(v.checks)
    partitioned = [
        k.path[0]
        for k in graph.get_all_asset_keys()
        if isinstance(graph.get(k).partitions_def, dg.MultiPartitionsDefinition) and graph.get(k).is_materializable  # not source_files
    ]
    assert sorted(partitioned) == sorted(registry.PARTITIONED) and set(registry.CORPUS) < set(registry.PARTITIONED)
    parents = {v: [p.path[0] for p in graph.get(dg.AssetKey(v)).parent_keys] for v in registry.PARTITIONED[1:]}
    for earlier, later in zip(registry.PARTITIONED, registry.PARTITIONED[1:]):
        assert earlier in parents[later]  # graph order


def test_the_retention_bounds_kun_yaml_accepts_are_the_versions_with_a_retention_check():
    from kun_dagster.config import RETENTION

    assert set(RETENTION) == {v.name for v in registry.VERSIONS if any(c.name == "retention" for c in v.checks)}


# -- the layout: no import cycle, each asset name in one module ----------------------------------
ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("kun_dagster", "assets", "checks", "resources", "automation")


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "kun_dagster").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, at the top or inside a function (an import moved
    into a function to dodge a cycle is still an arrow)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]  # `from . import x`: module x
            targets = named or [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_the_core_has_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # the registry is a leaf, but for the two helpers its WARN checks measure with: everything may import it
    assert graph["kun_dagster.registry"] <= {"kun_dagster.quality", "kun_dagster.storage"}


def test_each_asset_name_is_written_in_the_registry_alone():
    names = {s.name for s in registry.SPECS} | {registry.SOURCE_FILES}
    # the records' provenance columns name the models that made them: columns, not asset references
    columns = {("kun_dagster/dataset.py", registry.LABEL_MODEL), ("kun_dagster/dataset.py", registry.CHAT_MODEL)}
    found = []
    for d in PRODUCTION:
        for p in (ROOT / d).rglob("*.py"):
            rel = str(p.relative_to(ROOT))
            tree = ast.parse(p.read_text(encoding="utf-8"))
            exported = {
                id(n)
                for a in ast.walk(tree)
                if isinstance(a, ast.Assign) and "__all__" in ast.unparse(a.targets[0])
                for n in ast.walk(a.value)
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in exported and (rel, node.value) not in columns:
                    found.append(f"{rel}:{node.lineno} {node.value}")
    assert [f for f in found if not f.startswith("kun_dagster/registry.py")] == []


@pytest.mark.parametrize("band_steps", [False, True])
def test_the_step_groups_are_declared_jobs_in_the_order_kun_run_walks_them(tmp_path, band_steps):
    mode = {"dedup.mode": "band_steps"} if band_steps else {}
    defs = build_definitions(write_config(tmp_path, iterations=2, evaluation="on", **mode))
    declared = {j.name: j for j in defs.resolve_all_job_defs() if not j.name.startswith("__")}
    walked = registry.jobs(2, True, band_steps)
    assert [j.name for j in walked] == [
        "models",
        "corpus_head",
        *(["bands"] if band_steps else []),
        "clusters",
        "corpus_tail",
        "release",
        "evaluate",
        "card",
        "retrain_round2",
        "rescore_round2",
        "release_round2",
        "evaluate_round2",
        "card_round2",
    ]
    assert set(declared) == {j.name for j in walked}
    for j in walked:
        assert {k.to_user_string() for k in declared[j.name].asset_layer.selected_asset_keys} == set(j.assets)
    # every asset of the graph is in exactly one job, and each job's assets share one partitioning
    everything = [a for j in walked for a in j.assets]
    graph = defs.resolve_asset_graph()
    assert sorted(everything) == sorted(k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable)
    assert declared["clusters"].partitions_def == declared["corpus_head"].partitions_def  # one source's clusters: a backfill
    assert declared["models"].partitions_def is None and declared["release"].partitions_def.get_partition_keys() == [
        "wudao",
        "wanjuan",
        "skypile",
    ]
    assert [j.name for j in registry.jobs(1, False)] == ["models", "corpus_head", "clusters", "corpus_tail", "release", "card"]
    if band_steps:  # each source's 19 bands (threshold 0.8, num_perm 128), a source's bands one key range
        keys = [str(k) for k in declared["bands"].partitions_def.get_partition_keys()]
        assert keys == [f"{s}|{b}" for s in ("wudao", "wanjuan", "skypile") for b in range(19)]


def test_cli_names_no_asset_and_stays_short():
    text = (ROOT / "kun_dagster" / "cli.py").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    names = {s.name for s in registry.SPECS}
    assert [n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and n.value in names] == []
    assert "registry" not in text and "dagster_private" not in text


def test_the_release_and_the_card_read_only_what_they_declare():
    """The funnel, the card and the rounds come from declared inputs (their tallies and stats), not
    from other assets' storage: the modules that make them call no reader of a partition."""
    reads = ("quarantine_dir", "read_partition", "read_table", "partition_rows", "read_stats", "PartitionBatches", "tally")
    for rel in ("kun_dagster/dataset.py", "kun_dagster/card.py", "assets/dataset.py", "assets/evaluation.py"):
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
        }
        assert called.isdisjoint(reads), (rel, sorted(called & set(reads)))


def test_every_per_partition_stage_runs_through_the_one_driver():
    """Each partitioned asset's body hands its stage to assets/common.run_stage (duplicate_clusters,
    made for a whole source at once, reports through the same report_stage)."""
    driven = {}
    for rel in ("assets/corpus.py", "assets/dedup.py", "assets/pairs.py"):
        for fn in ast.walk(ast.parse((ROOT / rel).read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef) and fn.name in registry.PARTITIONED:
                driven[fn.name] = any(isinstance(n, ast.Name) and n.id == "run_stage" for n in ast.walk(fn))
    assert set(driven) == set(registry.PARTITIONED)
    assert {a for a, uses in driven.items() if not uses} == {registry.CLUSTERS}
