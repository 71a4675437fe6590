"""OpenAI-compatible servers behind one or more base URLs (`vllm serve` replicas, a load balancer,
a hosted judge): JSON requests in parallel, a bounded number in flight per URL, each sent to the
least busy URL and retried with backoff on a dropped connection, a timeout or a busy or failing
server (408, 429, 5xx), on another URL where there is one; a URL whose connections drop is passed
over for a rest that doubles with each drop in a row. Any other reply (a 4xx: a bad request) fails
at once: retrying it would fail the same way. The key is sent as a bearer token and never
appears in an error; URL passwords are masked in them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import requests
from requests.adapters import HTTPAdapter

from ..secrets import mask_uris
from .base import EngineError

RETRIED = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


class Endpoints:
    def __init__(
        self,
        urls: list[str],
        what: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 6,
        backoff: float = 1.0,
        max_in_flight: int = 64,
    ):
        if not urls:
            raise EngineError(f"{what}: no server URL given")
        self.urls, self.what = [u.rstrip("/") for u in urls], what
        self.timeout, self.retries, self.backoff, self.max_in_flight = timeout, retries, backoff, max_in_flight
        self._busy = dict.fromkeys(self.urls, 0)
        self._resting: dict[str, float] = {}  # URL -> until when it is passed over (its connections dropped)
        self._drops: dict[str, int] = {}  # URL -> connections dropped in a row
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a URL's request slot came free
        self._session = requests.Session()
        self._session.headers["Content-Type"] = "application/json"
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        for u in self.urls:  # keep-alive connections, enough for every request in flight
            self._session.mount(u, HTTPAdapter(pool_connections=1, pool_maxsize=max_in_flight))
        self._pool = ThreadPoolExecutor(max_in_flight * len(self.urls), thread_name_prefix="kun-endpoint")

    def _pick(self, avoid: str | None) -> str:
        """A URL with a free slot (under max_in_flight), among those not resting after dropped
        connections (all of them when every one rests): one other than the URL that just failed
        first, then the least busy. Waits for a slot; a dead URL's free slots draw no request."""
        with self._room:
            while True:
                now = time.monotonic()
                up = [u for u in self.urls if self._resting.get(u, 0) <= now] or self.urls
                free = [u for u in up if self._busy[u] < self.max_in_flight]
                if free:
                    url = min(free, key=lambda u: (u == avoid, self._busy[u]))
                    self._busy[url] += 1
                    return url
                self._room.wait(timeout=1.0)  # a slot comes free, or a URL's rest ends

    def _done(self, url: str) -> None:
        with self._room:
            self._busy[url] -= 1
            self._room.notify()

    def request(self, path: str, body: dict | None = None, url: str | None = None, stop: threading.Event | None = None) -> dict:
        """One request (POST with a body, else GET) to `url` or the least busy one, retried (until
        `stop` is set: another request of its call failed for good); its JSON reply."""
        last, error, stop = None, "", stop or threading.Event()
        for attempt in range(self.retries + 1):
            if attempt:
                if stop.wait(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)):
                    break  # another request of the call failed for good
            at = url or self._pick(avoid=last)
            try:
                if body is None:
                    r = self._session.get(at + path, timeout=self.timeout)
                else:
                    r = self._session.post(at + path, json=body, timeout=self.timeout)
            except requests.RequestException as e:  # refused, reset, dropped mid-reply, timed out
                last, error = at, f"{type(e).__name__}: {e}"
                with self._lock:  # each drop in a row doubles the URL's rest
                    self._drops[at] = self._drops.get(at, 0) + 1
                    self._resting[at] = time.monotonic() + min(self.backoff * 2 ** (self._drops[at] - 1), MAX_BACKOFF_S)
                continue
            finally:
                if url is None:
                    self._done(at)
            if self._drops.get(at):
                with self._lock:  # it answers again
                    self._drops.pop(at, None)
                    self._resting.pop(at, None)
            if r.status_code == 200:
                return r.json()
            last, error = at, f"HTTP {r.status_code}: {_reason(r)}"
            if r.status_code not in RETRIED:
                raise EngineError(f"{self.what}: {mask_uris(at + path)} answered {error}")
        raise EngineError(
            f"{self.what}: {mask_uris((last or url or self.urls[0]) + path)} failed after {self.retries + 1} tries: {mask_uris(error)}"
        )

    def map(self, path: str, bodies: list[dict], each: Callable[[dict], object] = lambda reply: reply) -> list:
        """`each(reply)` of every body's request, in order. The first request that fails for good
        stops the rest (none is retried after it) and its error is raised."""
        stop = threading.Event()
        futures = [self._pool.submit(lambda b: each(self.request(path, b, stop=stop)), b) for b in bodies]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            stop.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise failed.exception()
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()


def _reason(r: requests.Response) -> str:
    """The server's own message (vLLM and OpenAI: {"error": {"message": ...}} or {"message": ...})."""
    try:
        data = r.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        text = r.text
    text = str(text)
    return text if len(text) <= 300 else text[:300] + " ..."
