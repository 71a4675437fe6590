"""What can be checked before a long run: every source's glob matches files, the seed file exists,
each given model path holds a config and a tokenizer, the store is reachable. `kun validate` and
`kun run` report every problem at once, one line each, naming the key and the path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .config import KunConfig
from .corpus import list_files
from .storage import Store, StorageError, is_remote

# A tokenizer is any of these beside config.json (fast tokenizer, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def problems(cfg: KunConfig, offline: bool = False, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found, [] when the config can run; `offline` skips whatever needs the network."""
    store = Store.from_env(cfg.storage, os.environ if env is None else env)
    found: list[str] = []

    def skip(uri: str) -> bool:
        return offline and is_remote(uri)

    for i, s in enumerate(cfg.sources):
        uri = cfg.resolve(s.uri)
        if skip(uri):
            continue
        try:
            _, files = list_files(uri, store.options(uri))
        except Exception as e:  # noqa: BLE001 - unreachable store, bad URL: said plainly
            found.append(f"sources[{i}] ({s.name}): cannot list {uri}: {store.scrub(f'{type(e).__name__}: {e}')}")
            continue
        if not files:
            found.append(f"sources[{i}] ({s.name}): no file matches {uri}")

    seed = cfg.resolve(cfg.seed.uri)
    if not skip(seed) and not _exists(store, seed):
        found.append(f"seed.uri: no seed file at {seed}")

    for role in ("base", "label", "chat"):
        path = getattr(cfg.models, role).path
        if not path:
            continue
        path = cfg.resolve(path)
        if skip(path):
            continue
        if not _exists(store, f"{path.rstrip('/')}/config.json"):
            found.append(f"models.{role}.path: {path} holds no config.json (not a transformers checkpoint)")
        elif not any(_exists(store, f"{path.rstrip('/')}/{name}") for name in TOKENIZER_FILES):
            found.append(f"models.{role}.path: {path} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")

    base = cfg.base_uri
    if is_remote(base):
        if not offline:
            try:
                store.check(base)
            except StorageError as e:
                found.append(f"storage.base_uri: {e}")
    else:
        parent = Path(base)
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            found.append(f"storage.base_uri: cannot write under {base} ({parent} is not a writable folder)")
    return found


def _exists(store: Store, uri: str) -> bool:
    try:
        return store.path(uri).is_file()
    except Exception:  # noqa: BLE001 - an unreachable store: the path is not there for us
        return False
