"""The Kun config as a resource: assets read stage settings from it, the UI shows its path."""

import hashlib
import os
from functools import lru_cache

import dagster as dg
from upath import UPath

from kun_dagster import model_store
from kun_dagster.config import KunConfig, load_config
from kun_dagster.store import Store


@lru_cache(maxsize=8)
def _load_version(path: str, stamp: str, env: tuple) -> KunConfig:
    return load_config(path)


def _load(path: str) -> KunConfig:
    """kun.yaml, parsed once per process for each version of the file and of its KUN__ overrides:
    a process that goes on after the file changed (a notebook, a test, a second `kun run` in one
    process) reads the new one, never a stale copy."""
    try:
        with open(path, "rb") as f:
            stamp = hashlib.sha256(f.read()).hexdigest()  # a few KB: exact where mtimes are coarse
    except OSError:
        stamp = ""  # load_config says what is wrong with it
    return _load_version(path, stamp, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("KUN__"))))


class KunResource(dg.ConfigurableResource):
    """kun.yaml, parsed once per process, and the credentials for its s3:// URIs."""

    config_path: str
    # definitions.py sets these to dg.EnvVar(<the names in storage.s3>): the UI and the run config
    # show the variable's name, never its value. None: boto's own chain (~/.aws, instance/pod role).
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_session_token: str | None = None

    @property
    def config(self) -> KunConfig:
        return _load(self.config_path)

    @property
    def store(self) -> Store:
        creds = {"key": self.s3_access_key_id, "secret": self.s3_secret_access_key, "token": self.s3_session_token}
        return Store(self.config.storage, {k: v for k, v in creds.items() if v})

    @property
    def base(self) -> UPath:
        return self.store.path(self.config.base_uri)

    def local_model(self, path: str) -> str:
        """A model reference's checkpoint on the local disk (copied once from a remote store)."""
        return model_store.local_copy(path, self.config.model_cache, self.store)

    def checked_base(self) -> UPath:
        """The base URI, after one request that proves its store is reachable and accepts us."""
        self.store.check(self.config.base_uri)
        return self.base
