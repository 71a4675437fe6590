"""Store access: which filesystem a URI is on, how to reach it (S3 endpoint, credentials,
retries), and what to say when it cannot be reached (naming the URI and endpoint, never a secret).
Partition I/O on top of it is storage.py."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from upath import UPath

from . import secrets
from .config import StorageConfig


def upath(uri: str, storage_options: Mapping | None = None) -> UPath:
    return UPath(uri, **dict(storage_options or {}))


class StorageError(OSError):
    """The store cannot be reached or refuses us; the message names the URI and the endpoint, never a secret."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


@dataclass(frozen=True)
class Store:
    """How to reach every URI of a config: `storage_options` for remote URIs, plus for s3:// the
    endpoint, region, addressing style, retry policy and credentials. Local paths get none."""

    settings: StorageConfig = field(default_factory=StorageConfig)
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)  # s3fs key / secret / token

    def options(self, uri: str) -> dict:
        if not is_remote(uri):
            return {}
        opts = copy.deepcopy(dict(self.settings.storage_options))
        if not is_s3(uri):
            return opts
        s3 = self.settings.s3
        client = opts.setdefault("client_kwargs", {})
        if s3.endpoint_url:
            client["endpoint_url"] = s3.endpoint_url
        if s3.region:
            client["region_name"] = s3.region
        config = opts.setdefault("config_kwargs", {})
        config.setdefault("retries", {"max_attempts": s3.max_attempts, "mode": "standard"})  # exponential backoff with jitter
        config.setdefault("connect_timeout", s3.connect_timeout)
        if s3.path_style:
            config.setdefault("s3", {})["addressing_style"] = "path"
        return {**opts, **{k: v for k, v in self.credentials.items() if v}}

    def path(self, uri: str) -> UPath:
        return upath(uri, self.options(uri))

    def endpoint(self, uri: str) -> str:
        client = self.options(uri).get("client_kwargs", {})
        return client.get("endpoint_url") or f"AWS S3 ({client.get('region_name') or 'default region'})"

    def check(self, uri: str) -> None:
        """Fail fast and plainly when an s3:// URI's bucket cannot be reached, does not exist or
        refuses the credentials (one LIST of at most one key)."""
        if not is_s3(uri):
            return
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        try:
            self.path(uri).fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
            raise StorageError(self.describe(e, uri)) from None

    def describe(self, error: BaseException, uri: str) -> str:
        """What went wrong reaching `uri`, with the endpoint and the fix; credential values scrubbed."""
        s3 = self.settings.s3
        where = f"{uri} at endpoint {self.endpoint(uri)}"
        if isinstance(error, PermissionError):
            what = (
                f"the store refused the credentials or access for {where}; check the access key and secret in "
                f"${s3.access_key_id_env} / ${s3.secret_access_key_env} (values not shown) and the bucket policy"
            )
        elif isinstance(error, FileNotFoundError):
            what = f"the bucket of {where} does not exist; create it, or fix storage.base_uri"
        else:
            what = f"cannot reach {where} after {s3.max_attempts} attempts; check storage.s3.endpoint_url and that the store is up"
        return self.scrub(f"{what} ({type(error).__name__}: {error})")

    def scrub(self, text: str) -> str:
        """The text without a credential: the S3 key id, secret and token, credential-shaped values
        of storage_options, and URI passwords."""
        found = {v for v in self.credentials.values() if v} | secrets.values_under(self.settings.storage_options)
        return secrets.redact(text, found)

    @classmethod
    def from_env(cls, settings: StorageConfig, env: Mapping[str, str]) -> Store:
        """Credentials from the environment variables named in storage.s3 (the CLI's way; Dagster
        resources get the same through dg.EnvVar)."""
        s3 = settings.s3
        names = {"key": s3.access_key_id_env, "secret": s3.secret_access_key_env, "token": s3.session_token_env}
        return cls(settings, {k: env[n] for k, n in names.items() if env.get(n)})
