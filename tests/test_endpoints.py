"""The requests to OpenAI-compatible servers (llm/endpoints.py) against servers on loopback that
fail as real ones do, and the config of the server backend. The server engine itself is tested
against a real vLLM server in tests/test_vllm.py."""

import json
import socket
import threading
import time

import pytest
import yaml
from pydantic import ValidationError

from kun_dagster.config import KunConfig, load_config
from kun_dagster.llm.base import EngineError
from kun_dagster.llm.endpoints import Endpoints
from kun_dagster.secrets import secret_values

from .conftest import write_config
from .loopback import DROP, JSONServer


class Flaky(JSONServer):
    """A JSON server whose `plan` says what each request in turn gets: 200 (its body echoed with
    the request's number), another status, or "drop" (the connection closed without a reply)."""

    def __init__(self, plan=(), delay: float = 0.0):
        self.plan, self.delay, self.seen, self.auth = list(plan), delay, [], []
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()

        def respond(body: dict, headers: dict):
            with lock:
                n = len(self.seen)
                self.seen.append(body)
                self.auth.append(headers.get("Authorization"))
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                what = self.plan[n] if n < len(self.plan) else 200
            time.sleep(self.delay)
            with lock:
                self.in_flight -= 1
            if what == "drop":
                return DROP
            return what, {"n": n, **body} if what == 200 else {"error": {"message": f"planned {what}"}}

        super().__init__(respond)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens once closed


@pytest.fixture
def servers():
    made = []
    yield lambda *a, **k: made.append(Flaky(*a, **k)) or made[-1]
    for s in made:
        s.close()


def test_a_dropped_connection_and_a_busy_server_are_retried_and_a_bad_request_is_not(servers):
    flaky = servers(["drop", 503, 429])
    e = Endpoints([flaky.url], "test server", api_key="sk-planted-0123", retries=3, backoff=0.01)
    assert e.request("/completions", {"prompt": [1, 2]})["prompt"] == [1, 2]
    assert len(flaky.seen) == 4 and set(flaky.auth) == {"Bearer sk-planted-0123"}

    bad = servers([400])
    e = Endpoints([bad.url], "test server", retries=5, backoff=30)  # a retry would wait 15-30 s
    started = time.monotonic()
    with pytest.raises(EngineError, match="HTTP 400: planned 400"):
        e.request("/completions", {})
    assert time.monotonic() - started < 5 and len(bad.seen) == 1


def test_spent_retries_name_the_url_without_its_password_or_the_key(servers):
    down = servers([503] * 10)
    url = down.url.replace("http://", "http://kun:hunter2pass@")
    e = Endpoints([url], "test server", api_key="sk-planted-0123", retries=2, backoff=0.01)
    with pytest.raises(EngineError, match=r"failed after 3 tries: HTTP 503") as failed:
        e.request("/completions", {})
    assert "kun:***@127.0.0.1" in str(failed.value) and "hunter2pass" not in str(failed.value) and "sk-planted" not in str(failed.value)
    with pytest.raises(EngineError, match="ConnectionError"):
        Endpoints([_closed_port()], "test server", retries=1, backoff=0.01).request("/models")


def test_requests_run_in_parallel_bounded_per_url_in_order_and_around_a_dead_url(servers):
    a, b = servers(delay=0.05), servers(delay=0.05)
    e = Endpoints([a.url, b.url, _closed_port()], "test server", retries=4, backoff=0.05, max_in_flight=3)
    started = time.monotonic()
    got = e.map("/completions", [{"i": i} for i in range(60)], lambda reply: reply["i"])
    assert got == list(range(60))  # in the bodies' order, whichever URL answered
    assert a.most_in_flight <= 3 and b.most_in_flight <= 3 and a.most_in_flight + b.most_in_flight >= 4
    assert len(a.seen) + len(b.seen) == 60 and min(len(a.seen), len(b.seen)) >= 15
    assert time.monotonic() - started < 60 * 0.05 / 2  # parallel: well under the serial 3 s
    e.close()


def test_the_first_request_that_fails_for_good_fails_the_call(servers):
    flaky = servers([200, 400] + [200] * 100, delay=0.02)
    e = Endpoints([flaky.url], "test server", retries=0, max_in_flight=1)
    with pytest.raises(EngineError, match="HTTP 400"):
        e.map("/completions", [{"i": i} for i in range(100)])
    assert len(flaky.seen) < 100  # the rest were not sent
    e.close()


def test_a_role_on_servers_needs_their_urls_and_a_given_checkpoint(tmp_path):
    raw = yaml.safe_load(write_config(tmp_path).read_text())

    def cfg(role: dict, **top) -> KunConfig:
        return KunConfig.model_validate({**raw, **top, "models": {**raw["models"], "label": {**raw["models"].get("label", {}), **role}}})

    with pytest.raises(ValidationError, match="server.urls"):
        cfg({"backend": "server", "path": "/m"})
    with pytest.raises(ValidationError, match="give it as models.label.path"):
        cfg({"backend": "server", "server": {"urls": ["http://v:8000/v1"]}})
    ok = cfg({"backend": "server", "path": "/m", "server": {"urls": ["http://v:8000/v1"], "api_key_env": "KUN_VLLM_KEY"}})
    assert ok.models.label.server.max_in_flight == 64
    assert "sk-served-0123" in secret_values(ok, env={"KUN_VLLM_KEY": "sk-served-0123"})
    chat = {**raw["models"], "chat": {"backend": "server", "path": "/m", "server": {"urls": ["http://v:8000/v1"]}}}
    KunConfig.model_validate({**raw, "models": chat})
    with pytest.raises(ValidationError, match="iterations > 1"):
        KunConfig.model_validate({**raw, "models": chat, "iterations": 2})


def test_a_stage_on_servers_holds_no_gpu_and_takes_the_servers_pool(tmp_path):
    import dagster as dg

    from kun_dagster.definitions import build_definitions

    served = {"backend": "server", "path": str(tmp_path / "label"), "server": {"urls": ["http://v:8000/v1"]}}
    defs = build_definitions(write_config(tmp_path, **{"models.label": served}))
    labeled, scored = (defs.resolve_assets_def(a) for a in ("labeled_pairs", "scored_pairs"))
    assert labeled.op.pool == "llm_servers" and "dagster-k8s/config" not in labeled.op.tags
    assert scored.op.pool == "gpu" and "nvidia.com/gpu" in json.dumps(scored.op.tags)
    assert "vllm" in labeled.specs_by_key[dg.AssetKey("labeled_pairs")].kinds
    assert load_config(tmp_path / "kun.yaml").models.label.server.urls == ["http://v:8000/v1"]
