"""Per-batch checkpoints of an engine's work: a partition killed mid-stage resumes at its last
finished batch.

`Checkpointed` wraps any engine. Each call is split into batches of `rows` prompts; every finished
batch is written (atomically) as a Parquet file in the partition's staging folder, named by its
position and a hash of everything that produced it: the call, the model's content (its
fingerprint: weights and tokenizer, not its name), the parameters and the prompts. A rerun lists the folder once, reuses the batches it finds and computes only the rest;
a new config or new input hashes differently and is computed afresh. The IO manager deletes the
folder once the partition is published. Batches are the unit of seeding too (the transformers
engine seeds each call), so a resumed partition equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from upath import UPath

from .. import progress, storage
from .base import Engine, Generation, SamplingParams


class Checkpointed:
    def __init__(self, engine: Engine, directory: UPath, rows: int, label: str = ""):
        self.engine, self.directory, self.rows, self.label = engine, directory, max(1, rows), label or directory.name
        self.backend, self.model_name, self.tokenizer = engine.backend, engine.model_name, engine.tokenizer
        self.model_key = getattr(engine, "fingerprint", None) or engine.model_name  # engines built by LLMResource have one
        self.reused = self.computed = 0
        self._have = {p.name for p in directory.iterdir()} if directory.exists() else set()

    @property
    def stats(self) -> dict:
        return {"checkpoint_batches_reused": self.reused, "checkpoint_batches_computed": self.computed}

    def _batched(self, kind: str, items: list[str], key: object, compute, to_frame, from_frame) -> list:
        out: list = []
        with progress.task(f"{self.label} {kind}", total=len(items), unit="prompts") as bar:
            for start in range(0, len(items), self.rows):
                out.extend(self._batch(kind, items, start, key, compute, to_frame, from_frame))
                bar.update(min(self.rows, len(items) - start))
        return out

    def _batch(self, kind: str, items: list[str], start: int, key: object, compute, to_frame, from_frame) -> list:
        """One batch: read back when a finished file for exactly these inputs exists, else computed and kept."""
        batch = items[start : start + self.rows]
        digest = hashlib.sha256(json.dumps([kind, self.model_key, repr(key), batch], ensure_ascii=False).encode()).hexdigest()[:20]
        path = self.directory / f"{kind}-{start // self.rows:06d}-{digest}.parquet"
        if path.name in self._have:
            with path.open("rb") as f:
                got = from_frame(pq.read_table(f).to_pandas())
            self.reused += 1
            return got
        got = compute(batch)
        frame = to_frame(got)
        if len(frame) != len(batch):
            raise ValueError(f"{kind}: the engine returned {len(frame)} results for {len(batch)} prompts")
        if kind != "generate" or any(g.text for g in got):  # an all-empty batch is never kept: a rerun retries it
            storage.write_atomic(path, storage.parquet_bytes(frame))
            self._have.add(path.name)
        self.computed += 1
        return got

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        return self._batched(
            "generate",
            prompts,
            params,
            lambda b: self.engine.generate(b, params),
            lambda gens: pd.DataFrame(
                {
                    "text": [g.text for g in gens],
                    "num_tokens": [g.num_tokens for g in gens],
                    "finish_reason": [g.finish_reason for g in gens],
                }
            ),
            lambda df: [Generation(r.text, int(r.num_tokens), r.finish_reason) for r in df.itertuples()],
        )

    def choice_logprobs(self, prompts: list[str], choices: list[str], exact: bool = False) -> np.ndarray:
        rows = self._batched(
            "choice",
            prompts,
            (choices, exact),
            lambda b: list(self.engine.choice_logprobs(b, choices, exact)),
            lambda lps: pd.DataFrame({"logprobs": [np.asarray(p, dtype=float) for p in lps]}),
            lambda df: [np.asarray(p, dtype=float) for p in df["logprobs"]],
        )
        return np.asarray(rows, dtype=float).reshape(len(prompts), len(choices))

    def perplexity(self, texts: list[str]) -> np.ndarray:
        rows = self._batched(
            "perplexity",
            texts,
            None,
            lambda b: list(self.engine.perplexity(b)),
            lambda ppl: pd.DataFrame({"perplexity": np.asarray(ppl, dtype=float)}),
            lambda df: df["perplexity"].tolist(),
        )
        return np.asarray(rows, dtype=float)

    def close(self) -> None:  # the engine belongs to its resource, which closes it
        pass
