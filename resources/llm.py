"""The LLM engine of one model role (base, label, chat), loaded once per process.

GPU assets run all their partitions in one step (single-run backfill), so one backfill loads each
model once; the engine is closed when the step ends.
"""

from typing import Any, Literal

import dagster as dg
from pydantic import PrivateAttr

from kun_dagster import model_store
from kun_dagster.llm import Engine, EngineError, load_engine, resolve_backend
from kun_dagster.llm.base import EngineSpec

from .kun import KunResource


class LLMResource(dg.ConfigurableResource):
    kun: KunResource  # to reach checkpoints on a remote store
    role: Literal["base", "label", "chat"]
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = 16
    vllm: dict[str, Any] = {}  # kun_dagster.config.VLLMSettings fields (the vLLM backend's engine arguments)

    _engines: dict = PrivateAttr(default_factory=dict)

    def engine(self, model: dict) -> Engine:
        """The engine for a model reference (the value of base_model, label_model or chat_model)."""
        path = self.kun.local_model(model["path"])
        # what the files hold now (kept beside them, so cheap to re-check): a checkpoint swapped at the
        # same path after its model asset was materialized still never reuses the old one's batches
        fingerprint = model_store.fingerprint(path)
        if (path, fingerprint) not in self._engines:
            spec = EngineSpec(path=path, model_name=model["name"], backend=self.backend, device=self.device, dtype=self.dtype,
                              batch_size=self.batch_size, extra={"vllm": self.vllm})
            backend = resolve_backend(self.backend)
            dg.get_dagster_logger().info(f"loading {self.role} model {model['name']} from {path} on {backend} (backend: {self.backend})")
            try:
                engine = load_engine(spec)
            except EngineError as e:  # a model that cannot load will not load on a retry either
                raise dg.Failure(str(e), allow_retries=False) from e
            engine.fingerprint = fingerprint  # batch checkpoints are keyed by it (llm.checkpoint)
            self._engines[(path, fingerprint)] = engine
        return self._engines[(path, fingerprint)]

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
