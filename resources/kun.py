"""The Kun config as a resource: assets read stage settings from it, the UI shows its path."""

import dagster as dg
from pydantic import PrivateAttr
from upath import UPath

from kun_dagster import model_store
from kun_dagster.config import ConfigError, KunConfig, fingerprint, read_config
from kun_dagster.store import Store


class KunResource(dg.ConfigurableResource):
    """kun.yaml, parsed once per process, and the credentials for its s3:// URIs."""

    config_path: str
    # definitions.py sets these to dg.EnvVar(<the names in storage.s3>): the UI and the run config
    # show the variable's name, never its value. None: boto's own chain (~/.aws, instance/pod role).
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_session_token: str | None = None
    # the version of kun.yaml the definitions were built from (config.fingerprint); a step that
    # finds another refuses to run: its graph, code versions and checks are the old file's
    config_version: str | None = None

    _checked: KunConfig | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # once per run (per step process): a step reads `config` per partition, and hashing
        # kun.yaml and the environment each time cost 10% of a run over 300 empty shards
        self._checked = None
        self._checked = self.config

    @property
    def config(self) -> KunConfig:
        if self._checked is not None:
            return self._checked
        if self.config_version is not None and fingerprint(self.config_path) != self.config_version:
            raise ConfigError(
                f"{self.config_path} (or a KUN__ override) changed after this code location was loaded: the graph, its "
                "code versions and checks are the old file's. Reload the code location (the UI's Reload, or restart "
                "`dagster dev`) and launch again; `kun run` reloads by itself."
            )
        return read_config(self.config_path)

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
