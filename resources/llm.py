"""The LLM engine of one model role (base, label, chat), loaded once per process.

GPU assets run all their partitions in one step (single-run backfill), so one backfill loads each
model once; the engine is closed when the step ends.
"""

import time
from typing import Literal

import dagster as dg
from pydantic import PrivateAttr

from kun_dagster import model_store
from kun_dagster.llm import Engine, EngineError, load_engine, resolve_backend
from kun_dagster.llm.base import EngineSpec

from .kun import KunResource


class LLMResource(dg.ConfigurableResource):
    """A model role's engine, run as kun.yaml's `models.<role>` says (backend, dtype, vllm, ...):
    its settings are read from the config itself, not copied into resource fields."""

    kun: KunResource  # the config, and the store to reach checkpoints on
    role: Literal["base", "label", "chat"]

    _engines: dict = PrivateAttr(default_factory=dict)

    def engine(self, model: dict) -> Engine:
        """The engine for a model reference (the value of base_model, label_model or chat_model)."""
        settings = getattr(self.kun.config.models, self.role)
        if settings.backend == "server" and model.get("origin") != "given":  # round k's chat model, say: not what the servers load
            raise dg.Failure(
                f"{self.role} model {model['name']} was made by this pipeline ({model.get('origin')}); vLLM servers serve only "
                f"the checkpoint given as models.{self.role}.path. Run this role on vllm or transformers",
                allow_retries=False,
            )
        path = self.kun.local_model(model["path"])
        # what the files hold now (kept beside them, so cheap to re-check): a checkpoint swapped at the
        # same path after its model asset was materialized still never reuses the old one's batches
        fingerprint = model_store.fingerprint(path)
        if (path, fingerprint) not in self._engines:
            spec = EngineSpec(path=path, model_name=model["name"], settings=settings)
            backend = resolve_backend(settings.backend)
            dg.get_dagster_logger().info(
                f"loading {self.role} model {model['name']} from {path} on {backend} (backend: {settings.backend})"
            )
            started = time.perf_counter()
            try:
                engine = load_engine(spec)
            except EngineError as e:  # a model that cannot load will not load on a retry either
                raise dg.Failure(str(e), allow_retries=False) from e
            dg.get_dagster_logger().info(f"{self.role} model {model['name']} ready in {time.perf_counter() - started:.1f} s")
            engine.fingerprint = fingerprint  # batch checkpoints are keyed by it (llm.checkpoint)
            engine.system = model.get("system")  # a Humpback-tagged model is prompted as it was trained (prompts.system_of)
            self._engines[(path, fingerprint)] = engine
        return self._engines[(path, fingerprint)]

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for engine in self._engines.values():
            started = time.perf_counter()
            engine.close()
            dg.get_dagster_logger().info(f"{self.role} model {engine.model_name} closed in {time.perf_counter() - started:.1f} s")
        self._engines.clear()
