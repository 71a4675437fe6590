"""A scripted engine for testing the stages' own logic (filters, reasons, failure) without a model
(it keeps the protocol's contract: one result per prompt, in order, with a real tokenizer), and a
webhook receiver for the alert tests."""

import http.server
import json
import threading

import numpy as np

from kun_dagster.llm.base import Generation
from kun_dagster.training import train_tokenizer

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from .demo_texts import texts

        _TOKENIZER = train_tokenizer(texts(), 1000)
    return _TOKENIZER


class ScriptedEngine:
    backend = "scripted"
    model_name = "scripted"

    def __init__(self, replies=(), probs=(), ppl=()):
        """probs: per prompt, the probability of each answer as the reply's opening (their sum is
        the answer mass; what is left the model would put on other replies)."""
        self.tokenizer = tokenizer()
        self.replies, self.probs, self.ppl = list(replies), probs, ppl
        self.prompts: list[str] = []

    def generate(self, prompts, params):
        self.prompts += prompts
        out, self.replies = self.replies[: len(prompts)], self.replies[len(prompts) :]
        assert len(out) == len(prompts), "script ran out of replies"
        return [Generation(text=t, num_tokens=len(t), finish_reason="stop") for t in out]

    def choice_logprobs(self, prompts, choices, exact=False):
        self.prompts += prompts
        got, self.probs = self.probs[: len(prompts)], self.probs[len(prompts) :]
        with np.errstate(divide="ignore"):
            return np.log(np.asarray(got, dtype=float).reshape(len(prompts), len(choices)))

    def perplexity(self, texts):
        return np.asarray(self.ppl[: len(texts)], dtype=float)

    def close(self):
        pass


class Receiver(http.server.ThreadingHTTPServer):
    """A Slack-compatible webhook on loopback that keeps every JSON body it is sent."""

    def __init__(self):
        self.bodies: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
