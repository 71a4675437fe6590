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
