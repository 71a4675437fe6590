"""What can be checked before a long run: every source's glob matches files whose first records
become documents (the fields, format and encoding are right), the seed file exists, each given
model path holds a config and a tokenizer, the store is reachable. `kun validate` and
`kun run` report every problem at once, one line each, naming the key and the path."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from . import corpus
from .config import KunConfig
from .corpus import list_files
from .store import StorageError, Store, is_remote

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
            fs, files = list_files(uri, store.options(uri), cfg.manifest(s))
        except Exception as e:  # noqa: BLE001 - unreachable store, bad URL: said plainly
            found.append(f"sources[{i}] ({s.name}): cannot list {uri}: {store.scrub(f'{type(e).__name__}: {e}')}")
            continue
        if not files:
            found.append(f"sources[{i}] ({s.name}): no file matches {uri}")
        elif problem := _first_records(s, fs, files):
            found.append(f"sources[{i}] ({s.name}): {problem}")

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


def _first_records(source, fs, files: list[tuple[str, str]], n: int = 20, most: int = 3) -> str | None:
    """A problem when none of the first `n` records of the source's first `most` files becomes a
    document (a misspelt text_field, the wrong format or encoding), naming the reasons and the keys
    seen. One good record anywhere in them is enough: bad rows are for the quarantine, not a
    reason to refuse the run."""
    reasons: Counter = Counter()
    keys: Counter = Counter()
    for path, rel in files[:most]:
        try:
            for k, (kind, _row, *item) in enumerate(corpus.documents(fs, path, rel, source)):
                if kind == "doc":
                    return None
                if k >= n:
                    break
                if item[0] == corpus.UNREADABLE_FILE:  # a broken file is data for the quarantine, not a config error
                    continue
                reasons[f"{item[0]} ({item[1][:80]})"] += 1
                raw = item[2]
                if isinstance(raw, str):  # a JSONL line
                    try:
                        raw = json.loads(raw)
                    except (ValueError, RecursionError):
                        pass
                if isinstance(raw, dict):
                    keys.update(list(raw))
        except Exception:  # noqa: BLE001 - an unreadable file is for ingest to quarantine
            continue
    if not reasons:
        return None  # empty files say nothing about the fields
    seen = f"; keys seen: {', '.join(k for k, _ in keys.most_common(8))}" if keys else ""
    where = files[0][1] if len(files) == 1 else f"{files[0][1]} and {min(len(files), most) - 1} more file(s)"
    return f"none of the first {sum(reasons.values())} records of {where} is a document: {reasons.most_common(1)[0][0]}{seen}"


def _exists(store: Store, uri: str) -> bool:
    try:
        return store.path(uri).is_file()
    except Exception:  # noqa: BLE001 - an unreachable store: the path is not there for us
        return False
