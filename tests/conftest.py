"""Shared fixtures: a test config over the demo corpora, and the tiny models built once per session."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = ["seed_data", "base_model", "label_model", "chat_model"]  # the unpartitioned assets
CORPUS = [
    "raw_corpus",
    "filtered_corpus",
    "minhash_signatures",
    "duplicate_clusters",
    "deduped_corpus",
    "labeled_pairs",
    "scored_pairs",
    "polished_pairs",
]  # source x shard, in graph order
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine in-process: seconds, not a minute, to start
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one core each, or torch's and vLLM's threads fight
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cpus[int(worker.removeprefix("gw")) % len(cpus)]))
warnings.filterwarnings("ignore", module="dagster")

# `pytest -n 2` (the README's test command): each worker takes whole groups of tests, a module (its
# module-scoped fixtures built once) or a part of one that SPLIT cuts in n. The heaviest group goes
# first, then, while its worker trains the session's tiny models (a minute), the other takes the
# modules that need no model, then the rest heaviest first (seconds on one worker, measured:
# bench/README.md, "CI"), so that the two end together rather than one running a slow module alone.
WEIGHT = {
    "test_dev_recovery": 170,
    "test_wild": 115,
    "test_ui": 145,
    "test_rounds": 130,
    "test_automation_daemon": 125,
    "test_s3": 120,
    "test_ui_scale": 115,
    "test_training_resume": 85,
    "test_automation": 85,
    "test_cli": 70,
    "test_vllm": 100,
    "test_stale": 32,
    "test_recovery": 30,
    "test_pipeline": 20,
    "test_resume": 16,
    "test_dedup_graph": 10,
}
SPLIT = {"test_wild": 2, "test_dev_recovery": 2, "test_automation_daemon": 2}


def _module(nodeid: str) -> str:
    return Path(nodeid.split("::")[0]).stem


def pytest_collection_modifyitems(config, items):
    modules = sorted({_module(item.nodeid) for item in items})  # sorted: every worker collects one order
    if not modules:
        return
    modelled = {_module(item.nodeid) for item in items if "models_run" in getattr(item, "fixturenames", ())}
    share = {m: WEIGHT.get(m, 0) / SPLIT.get(m, 1) for m in modules}
    first = max(modules, key=share.get)
    items.sort(key=lambda item: (_module(item.nodeid) != first, _module(item.nodeid) in modelled, -share[_module(item.nodeid)]))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's per-file scheduling over the groups above (its `xdist_group` marks do nothing
    under pytest 9.2, which no longer reads the node ids xdist rewrites)."""
    from xdist.scheduler import LoadScopeScheduling

    index: dict[str, int] = {}  # a test's place in its module, in collection order
    counts: dict[str, int] = {}

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            if module not in SPLIT:
                return module
            if nodeid not in index:
                index[nodeid] = counts[module] = counts.get(module, -1) + 1
            return f"{module}-{index[nodeid] % SPLIT[module]}"

    return Groups(config, log)


def write_config(tmp: Path, **overrides) -> Path:
    """The repo's kun.yaml with absolute demo paths, local storage under tmp, and quick settings."""
    cfg = yaml.safe_load((REPO / "kun.yaml").read_text())
    for s in cfg["sources"]:
        s["uri"] = str(REPO / s["uri"])
    cfg["seed"]["uri"] = str(REPO / cfg["seed"]["uri"])
    cfg["storage"] = {"base_uri": str(tmp / "data")}
    cfg["models"]["base"]["tiny"]["pretrain_epochs"] = 8  # fewer than the demo's 20: a weaker but quicker base
    cfg["sampling"]["max_tokens"] = 64
    cfg["filter"]["perplexity_max"] = 1e5  # computed, but the weaker base must not drop real text
    cfg["iterations"], cfg["evaluation"] = 1, {"enabled": False}  # the demo's rounds and evaluation: tests/test_rounds.py
    # the tests' weaker base (8 pre-training epochs) needs every seed to write answers the output
    # filters keep; tests/test_rounds.py holds 10% out as the demo does
    cfg["seed"]["eval_fraction"] = 0.0
    for role in ("base", "label", "chat"):  # the reference engine; tests/test_vllm.py runs the graph on vLLM
        cfg["models"][role]["backend"] = "transformers"
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / "kun.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(f"{url}/graphql", json.dumps({"query": query}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"]


def wait_for(what: str, ready, timeout: float, log: Path, every: float = 2.0):
    """Poll `ready()` until it returns something truthy; on timeout fail with the server's log tail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ready()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; dagster dev log:\n{log.read_text()[-4000:]}")


def location_loaded(url: str) -> bool:
    try:
        data = graphql(
            url,
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
            "locationOrLoadError { __typename ... on PythonError { message } } } } } }",
        )
    except OSError:
        return False  # the webserver is not up yet
    entries = data["workspaceOrError"]["locationEntries"]
    for e in entries:
        if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError":
            pytest.fail(f"code location {e['name']} failed to load: {e['locationOrLoadError']['message']}")
    return bool(entries) and all(e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)


@contextlib.contextmanager
def dagster_dev(env: dict, log: Path, port: int):
    """`dagster dev` (webserver, daemon, code server) on a loopback port, until the code location has
    loaded; yields its URL; stops it with Ctrl-C, then kills whatever its session left. Its backfill
    daemon iterates every 3 s, not 30 (tests/pace/sitecustomize.py)."""
    pace = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "pace"), os.environ.get("PYTHONPATH")]))}
    pace["KUN_TEST_DAEMON_INTERVAL"] = "3"
    # SIGINT at its default: a shell may start us with it ignored, and then Python would never see
    # the Ctrl-C that shuts dagster dev (webserver, daemon, code servers) down.
    launcher = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                launcher,
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env={**os.environ, **pace, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if server.poll() is not None:
                pytest.fail(f"dagster dev exited with {server.returncode}: {log.read_text()[-4000:]}")
            return location_loaded(url)

        wait_for("the webserver and the kun code location", up, 240, log)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: dagster dev stops its webserver, daemon and code servers (seconds)
        try:
            server.wait(60)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # whatever it left behind in its session
            except ProcessLookupError:
                pass


def kill_when(argv: list[str], env: dict, ready, what: str, timeout: float = 300) -> None:
    """Start `argv` in a process group of its own and SIGKILL the group once `ready()` holds (as an
    OOM kill or a closed laptop would), failing if it ends first."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the process ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
            time.sleep(0.05)
    finally:  # also when the wait fails or the test is interrupted: nothing outlives its test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def kill_kun_run_when(cfg: Path, home: Path, ready, what: str, timeout: float = 300) -> None:
    """`kun run --source wudao` on `cfg`, SIGKILLed once `ready()` holds."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "KUN_CONFIG": str(cfg), "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "kun_dagster.cli", "run", "--config", str(cfg), "--source", "wudao", "--progress", "off"]
    kill_when(argv, env, ready, what, timeout)


def given_models(models_run) -> dict[str, str]:
    """write_config overrides that use the session's trained models as given checkpoints."""
    return {f"models.{r}.path": models_run["refs"][f"{r}_model"]["path"] for r in ("base", "label", "chat")}


def assert_fresh(cfg_file: Path, instance) -> None:
    """After a finished `kun run`: no partition is stale (automation/stale.py over Dagster's own
    resolver), and two ticks of the daemon's automation would request nothing."""
    import dagster as dg

    from kun_dagster.definitions import build_definitions

    from .stale import stale_partitions

    defs = build_definitions(cfg_file)
    assert stale_partitions(defs, instance) == {}
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert first.total_requested == 0 and second.total_requested == 0


def figures(table) -> dict:
    """A two-column table metadata value (ui.figures) back as {first column: second}."""
    key, value = (c.name for c in table.schema.columns[:2])
    return {r.data[key]: r.data[value] for r in table.records}


@pytest.fixture(scope="session")
def planted() -> list[dict]:
    return json.loads((REPO / "demo" / "planted.json").read_text())


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the base temp's parent under xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def models_run(shared_dir):
    """seed_data, base_model, label_model and chat_model materialized once through Dagster, once per
    test session: the first worker trains them (on a Dagster instance on disk), the others wait on
    the lock and open the same instance and store (read-only for the models; only test_pipeline
    writes corpus partitions to this store)."""
    import dagster as dg
    from filelock import FileLock

    from kun_dagster.definitions import build_definitions

    # KUN_TEST_MODELS: a folder kept between sessions while you iterate (delete it when training changes)
    root = Path(os.environ.get("KUN_TEST_MODELS") or shared_dir / "models_run")
    with FileLock(str(root) + ".lock"):
        if not (root / "refs.json").is_file():
            (root / "home").mkdir(parents=True, exist_ok=True)
            cfg_file = write_config(root)
            defs = build_definitions(cfg_file)
            with dg.DagsterInstance.local_temp(str(root / "home")) as instance:
                result = dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance)
                assert result.success
                refs = {k: result.output_for_node(k) for k in ("base_model", "label_model", "chat_model")}
            (root / "refs.json").write_text(json.dumps(refs))
    cfg_file = root / "kun.yaml"
    instance = dg.DagsterInstance.local_temp(str(root / "home"))
    refs = json.loads((root / "refs.json").read_text())
    return {"defs": build_definitions(cfg_file), "instance": instance, "refs": refs, "cfg_file": cfg_file}


@pytest.fixture(scope="session")
def label_engine(models_run):
    from kun_dagster.llm import load_engine
    from kun_dagster.llm.base import EngineSpec

    ref = models_run["refs"]["label_model"]
    return load_engine(EngineSpec.of(ref["path"], ref["name"], backend="transformers", batch_size=8))


@pytest.fixture(scope="session")
def base_engine(models_run):
    from kun_dagster.llm import load_engine
    from kun_dagster.llm.base import EngineSpec

    ref = models_run["refs"]["base_model"]
    return load_engine(EngineSpec.of(ref["path"], ref["name"], backend="transformers", batch_size=8))


@pytest.fixture(scope="session")
def chat_engine(models_run):
    from kun_dagster.llm import load_engine
    from kun_dagster.llm.base import EngineSpec

    ref = models_run["refs"]["chat_model"]
    return load_engine(EngineSpec.of(ref["path"], ref["name"], backend="transformers", batch_size=8))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for this test session (tests/postgres.py); CI requires one
    (KUN_REQUIRE_POSTGRES=1: .ci/run installs Debian's postgresql), elsewhere its tests skip without."""
    from .postgres import Postgres, binaries, wait_ready

    if binaries() is None:
        if os.environ.get("KUN_REQUIRE_POSTGRES"):
            pytest.fail("KUN_REQUIRE_POSTGRES is set but PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pg = Postgres(free_port())
    wait_ready(pg)
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request):
    """Each instance-storage backend a deployment uses: None for SQLite (one machine), a new
    database's URL on the session's PostgreSQL server (production)."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres").database()
