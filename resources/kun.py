"""The Kun config as a resource: assets read stage settings from it, the UI shows its path."""

from functools import lru_cache

import dagster as dg
from upath import UPath

from kun_dagster import storage
from kun_dagster.config import KunConfig, load_config


@lru_cache(maxsize=8)
def _load(path: str) -> KunConfig:
    return load_config(path)


class KunResource(dg.ConfigurableResource):
    """kun.yaml, parsed once per process."""

    config_path: str

    @property
    def config(self) -> KunConfig:
        return _load(self.config_path)

    @property
    def base(self) -> UPath:
        cfg = self.config
        return storage.upath(cfg.base_uri, cfg.storage.storage_options)
