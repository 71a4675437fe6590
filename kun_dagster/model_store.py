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

from .store import Store, is_remote

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
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MODEL_CARD and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
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
    listing = {
        k[len(root) :].lstrip("/"): [v.get("size"), str(v.get("ETag") or v.get("LastModified") or v.get("mtime") or v.get("created"))]
        for k, v in sorted(found.items())
    }
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
    outside = [rel for rel in listing if not _inside(tmp, rel)]
    if outside:  # whoever controls the bucket must not write anywhere on this disk
        raise ModelError(f"{uri}: refused: object key(s) {outside[:3]} would be written outside the model cache")
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


def _inside(folder: Path, rel: str) -> bool:
    """`rel` names a file under `folder` (no .., no absolute path, no empty name)."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts and (folder / rel).resolve().is_relative_to(folder.resolve())


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


class ModelError(ValueError):
    """A configured model that cannot be used as it is (no retry will fix it)."""


def ref(role: str, path: str, local: str | Path, origin: str) -> dict:
    """A model asset's value: where the checkpoint is (local folder or remote URI), what its content
    is (fingerprint of the weights and tokenizer) and what training wrote about it (its card).
    Trained models are named kun-<role>; a given one keeps its folder's name."""
    card = Path(local) / MODEL_CARD
    return {
        "role": role,
        "name": f"{Path(path.rstrip('/')).name}" if origin == "given" else f"kun-{role}",
        "path": path if is_remote(path) else str(Path(path).resolve()),
        "origin": origin,
        "fingerprint": fingerprint(local),
        "card": json.loads(card.read_text()) if card.exists() else {},
    }


def given(role: str, path: str, store: Store, cache_dir: str | Path) -> dict:
    """The reference of a checkpoint used as given (models.<role>.path)."""
    if not (store.path(path) / "config.json").is_file():
        raise ModelError(f"{role} model path {path} is not a transformers checkpoint (no config.json)")
    return ref(role, path, local_copy(path, cache_dir, store), "given")


def trained(role: str, models_dir: str, cache_dir: str | Path, run_tag: str, store: Store, train) -> tuple[dict, object]:
    """Train into a local folder (models_dir/<role> itself when local), then, under a remote
    models_dir, publish to a versioned folder <role>/<run_tag>: a reader never meets a half-replaced
    model. `train(folder)` returns its report (with .path); returns (reference, report)."""
    remote = is_remote(models_dir)
    local = Path(cache_dir) / "trained" / f"{role}-{run_tag}" if remote else Path(models_dir) / role
    report = train(local)
    path = publish(report.path, f"{models_dir}/{role}/{run_tag}", store) if remote else report.path
    return ref(role, path, report.path, "tiny" if role == "base" else "trained"), report
