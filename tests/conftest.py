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
warnings.filterwarnings("ignore", module="dagster")


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
    loaded; yields its URL; stops it with Ctrl-C, then kills whatever its session left."""
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
            env={**os.environ, **env},
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

    from automation.stale import stale_partitions
    from kun_dagster.definitions import build_definitions

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
def session_cfg_file(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("kun"))


@pytest.fixture(scope="session")
def models_run(session_cfg_file):
    """seed_data, base_model, label_model and chat_model materialized once through Dagster."""
    import dagster as dg

    from kun_dagster.definitions import build_definitions

    defs = build_definitions(session_cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(list(defs.assets), selection=MODELS, resources=defs.resources, instance=instance)
    assert result.success
    refs = {k: result.output_for_node(k) for k in ("base_model", "label_model", "chat_model")}
    return {"defs": defs, "instance": instance, "refs": refs, "cfg_file": session_cfg_file}


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
