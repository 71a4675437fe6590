"""Model checkpoints on any store. Engines and trainers need a checkpoint on a local disk (they
memory-map the weights), so one under an s3:// URI is copied once into a local cache and reused
while the remote files are unchanged; a checkpoint trained here is uploaded to its own versioned
folder, so a reader never meets a half-replaced model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

from .storage import Store, is_remote

MARKER = ".kun-cache.json"  # the remote listing a cached copy was made from
MODEL_CARD = "kun_model.json"  # what training wrote about a checkpoint (not part of its content)
FINGERPRINT = ".kun-fingerprint.json"  # a checkpoint's fingerprint and the file listing it was computed from


def fingerprint(local_dir: str | Path) -> str:
    """The content of a checkpoint: a hash of every file of its weights, config and tokenizer
    (not our card, not hidden files). Batch checkpoints are keyed by it, so a retrained or swapped
    model never reuses another's work. The result is kept beside the files with their sizes and
    modification times, so a later call re-reads nothing unless a file changed (a read-only folder
    is simply hashed again)."""
    root = Path(local_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MODEL_CARD
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if not files:
        raise FileNotFoundError(f"no model files under {root}")
    kept = root / FINGERPRINT
    try:
        known = json.loads(kept.read_text())
        if known["listing"] == listing:
            return known["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.blake2b(digest_size=16)
    for p, (rel, size, _) in zip(files, listing):
        h.update(f"{rel}\0{size}\0".encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        kept.write_text(json.dumps({"fingerprint": digest, "listing": listing}))
    except OSError:
        pass
    return digest


def _listing(store: Store, uri: str) -> tuple[object, str, dict[str, list]]:
    src = store.path(uri)
    found = src.fs.find(src.path, detail=True)
    if not found:
        raise FileNotFoundError(f"no model files under {uri}")
    root = src.path.rstrip("/")
    listing = {k[len(root):].lstrip("/"): [v.get("size"), str(v.get("ETag") or v.get("LastModified") or v.get("mtime") or v.get("created"))]
               for k, v in sorted(found.items())}
    return src.fs, root, listing


def local_copy(uri: str, cache_dir: str | Path, store: Store) -> str:
    """A local folder holding the checkpoint at `uri`: the path itself when local, else the cached copy."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    fs, root, listing = _listing(store, uri)
    target = Path(cache_dir) / f"{Path(root).name}-{hashlib.sha1(uri.encode()).hexdigest()[:12]}"
    if _is_copy_of(target, listing):
        return str(target)
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")  # whole or nothing: renamed into place
    try:
        for rel in listing:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{root}/{rel}", str(tmp / rel))
        (tmp / MARKER).write_text(json.dumps(listing))
        if target.exists():  # an older copy of a changed model
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_copy_of(target, listing):  # not a concurrent process that won the race with the same copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _is_copy_of(target: Path, listing: dict) -> bool:
    marker = target / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == listing


def publish(local_dir: str | Path, uri: str, store: Store) -> str:
    """Upload a locally trained checkpoint to `uri` (a fresh, versioned folder); a local `uri` is
    where training already wrote it."""
    if not is_remote(uri):
        return str(local_dir)
    dst = store.path(uri)
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            dst.fs.put_file(str(f), f"{dst.path}/{f.relative_to(local_dir).as_posix()}")
    return uri
