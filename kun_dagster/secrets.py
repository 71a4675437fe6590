"""What of a config may be published, and how a secret is kept out of everything else.

The dataset card and Dagster's metadata get an allow-list: the keys that shape the data (each
asset's code-version keys), with passwords in URIs masked. Every other text that leaves a step
(error messages, log lines, alerts) goes through `redact`, which removes the values the config
and the environment mark as secret: anything under storage.storage_options, engine_kwargs and
deploy.k8s whose key looks like a credential, the S3 credentials' variables, and the password of
any user:password@ URI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from .config import KunConfig

MASK = "***"
# A key holds a credential when its last word names one (token, aws_session_token, api_key,
# client_secret, password; not max_tokens or prompt_token_budget), or it names an access key.
_WORDS = frozenset(
    {"secret", "token", "password", "passwd", "pwd", "pass", "key", "apikey", "credential", "credentials", "auth", "authorization"}
    | {"signature", "cookie", "sas", "dsn"}
)


def is_secret_key(name: object) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()
    parts = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    return bool(parts) and (parts[-1] in _WORDS or "access_key" in words or "private_key" in words)


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@")


def mask_uris(text: str) -> str:
    """user:password@host -> user:***@host in every URI of the text."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def _walk(node, secret: bool = False) -> Iterable[str]:
    """Every string leaf of a tree that sits under a credential-shaped key (or all, with secret)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, secret or is_secret_key(k))
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk(v, secret)
    elif secret and node is not None and not isinstance(node, bool):
        yield str(node)


def values_under(tree) -> set[str]:
    """The credential-shaped values of a config subtree (storage_options, engine_kwargs, deploy.k8s)."""
    return {v for v in _walk(tree) if len(v) >= 4}


def secret_values(cfg: KunConfig, env: Mapping[str, str] | None = None) -> set[str]:
    """The secret strings a config holds or names: credential-shaped keys' values under
    storage.storage_options, every role's vllm.engine_kwargs and deploy.k8s; the S3 credential
    variables and the vLLM servers' key; the passwords of URIs anywhere in it. Strings under 4 characters are left (masking
    'a' everywhere would hide the text, not the secret)."""
    env = os.environ if env is None else env
    tree = cfg.model_dump(mode="json")
    found = values_under(tree["storage"]["storage_options"]) | values_under(tree["deploy"]["k8s"])
    for role in ("base", "label", "chat"):
        found |= values_under(tree["models"][role]["vllm"]["engine_kwargs"])
        if (name := getattr(cfg.models, role).server.api_key_env) and env.get(name):  # the vLLM servers' key
            found.add(env[name])
    s3 = cfg.storage.s3
    found |= {env[n] for n in (s3.access_key_id_env, s3.secret_access_key_env, s3.session_token_env) if env.get(n)}
    if env.get(cfg.evaluation.judge.api_key_env):  # the judge endpoint's key
        found.add(env[cfg.evaluation.judge.api_key_env])
    found |= {m["password"] for text in _walk(tree, secret=True) for m in _USERINFO.finditer(text)}
    return {v for v in found if len(v) >= 4}


def redact(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret value and every URI password masked (longest first, so a secret
    that contains another goes whole)."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return mask_uris(text)


def published(tree, secret: bool = False):
    """A config subtree as it may be published: credential-shaped keys' values masked, URI
    passwords masked."""
    if isinstance(tree, Mapping):
        return {k: published(v, secret or is_secret_key(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [published(v, secret) for v in tree]
    if secret and tree is not None and not isinstance(tree, bool):
        return MASK
    return mask_uris(tree) if isinstance(tree, str) else tree
