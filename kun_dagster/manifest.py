"""A source's files read from a manifest instead of listed from the store (`sources[].manifest`):
millions of S3 keys are a thousand LIST requests each time a source is listed; a manifest is a few
GETs. Two kinds:

- an S3 Inventory report's `manifest.json` (AWS writes one a day or a week: `fileFormat` CSV or
  Parquet, `fileSchema`, and the data files under `destinationBucket`): every current object of
  the bucket, with its size and ETag; delete markers and older versions are left out;
- a file the team writes: JSONL, CSV or Parquet (gzip allowed) with a `path` column (the file's
  URI or path, or its path under the source glob's folder) and, optionally, `size` and `etag` or
  `mtime`: what says a file changed, as a listing would.

Either way only the entries the source's `uri` glob matches are the source's files, so one
bucket's inventory serves every source in it.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator

import fsspec
import pandas as pd

# S3 Inventory's field names (fileSchema) as a listing's info keys
_INVENTORY = {"Size": "size", "ETag": "ETag", "LastModifiedDate": "LastModified"}


class ManifestError(ValueError):
    """A manifest that cannot be read as one."""


def entries(manifest: str, storage_options: dict | None, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, dict]]:
    """(path in `fs`'s terms, listing info) of every file the manifest names. `storage_options`
    are the source's store's: they go with a manifest on that kind of store only (a local manifest
    of an S3 source is read as a local file)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    scheme = manifest.split("://", 1)[0] if "://" in manifest else "file"
    storage_options = storage_options if scheme in protocols else None
    mfs, mpath = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    mfs.invalidate_cache()  # a manifest rewritten since this process last read it (corpus._fs)
    if mpath.endswith(".json"):
        with mfs.open(mpath, "rb") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "files" not in doc or "fileSchema" not in doc:
            raise ManifestError(f"{manifest}: a .json manifest must be an S3 Inventory manifest.json (files, fileSchema)")
        yield from _inventory(doc, manifest, storage_options if "s3" in protocols else None)
        return
    frame = _table(mfs, mpath, manifest)
    if "path" not in frame.columns:
        raise ManifestError(f"{manifest}: no 'path' column (columns: {', '.join(map(str, frame.columns))})")
    for row in frame.itertuples(index=False):
        path = str(row.path)
        if "://" in path:
            path = fs._strip_protocol(path)
        elif not path.startswith("/") and root:
            path = f"{root}/{path}"
        info = {k: getattr(row, k) for k in ("size", "etag", "mtime") if k in frame.columns and pd.notna(getattr(row, k))}
        if "size" in info:  # a column with gaps reads as floats
            info["size"] = int(float(info["size"]))
        yield path, info


def _table(fs, path: str, name: str) -> pd.DataFrame:
    kind = path.removesuffix(".gz")
    with fs.open(path, "rb", compression="infer") as f:
        if kind.endswith(".parquet"):
            return pd.read_parquet(f)
        if kind.endswith(".jsonl"):
            return pd.read_json(f, lines=True, dtype=False)
        if kind.endswith(".csv"):
            return pd.read_csv(f, dtype={"path": str})
    raise ManifestError(f"{name}: a manifest is .jsonl, .csv or .parquet (gzip allowed), or an S3 Inventory manifest.json")


def _inventory(doc: dict, manifest: str, storage_options: dict | None) -> Iterator[tuple[str, dict]]:
    schema = [c.strip() for c in str(doc["fileSchema"]).split(",")]
    bucket = str(doc.get("destinationBucket", "")).split(":::")[-1]
    kind = str(doc.get("fileFormat", "CSV")).upper()
    if "Bucket" not in schema or "Key" not in schema or kind not in ("CSV", "PARQUET"):
        raise ManifestError(f"{manifest}: an S3 Inventory of format {kind} with fields {schema}: CSV or Parquet with Bucket and Key needed")
    for part in doc["files"]:
        uri = f"s3://{bucket}/{part['key']}"
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        fs.invalidate_cache(path)
        with fs.open(path, "rb", compression="gzip" if kind == "CSV" else None) as f:
            if kind == "CSV":  # no header, keys URL-encoded
                frame = pd.read_csv(f, header=None, names=schema, dtype=str, keep_default_na=False)
                frame["Key"] = frame["Key"].map(urllib.parse.unquote_plus)
            else:
                frame = pd.read_parquet(f).rename(columns=lambda c: {_snake(s): s for s in schema}.get(c, c))
        if "IsDeleteMarker" in frame.columns:
            frame = frame[~frame["IsDeleteMarker"].astype(str).str.lower().isin(("true", "1"))]
        if "IsLatest" in frame.columns:
            frame = frame[frame["IsLatest"].astype(str).str.lower().isin(("true", "1"))]
        for row in frame.to_dict("records"):
            info = {_INVENTORY[k]: row[k] for k in _INVENTORY if k in row and pd.notna(row[k]) and row[k] != ""}
            if "size" in info:
                info["size"] = int(float(info["size"]))
            if "ETag" in info and not str(info["ETag"]).startswith('"'):  # quoted, as a LIST reply gives it
                info["ETag"] = f'"{info["ETag"]}"'
            yield f"{row['Bucket']}/{row['Key']}", info


def _snake(name: str) -> str:
    """S3 Inventory's Parquet column for a fileSchema field: LastModifiedDate -> last_modified_date."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))
