"""The feature cache: one uncompressed Arrow IPC file of embeddings (normative spec: docs/cache-format.md).

Opening a float32 cache memory-maps the file and returns the embeddings as a read-only (N, d)
numpy view of the mapped pages: no private copy. float16 caches are upcast on read (a copy).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from msae import atomic
from msae.arrays import check_embeddings, first_nonfinite_row
from msae.errors import MsaeError

FORMAT = "msae-feature-cache"
FORMAT_VERSION = "1"
MAGIC = b"ARROW1"
EMBEDDING, ID, TEXT, LABEL = "embedding", "id", "text", "label"
DTYPES = ("float32", "float16")
MODALITIES = ("image", "text")
_META_KEYS = ("format", "format_version", "model", "pretrained", "modality", "source", "split", "n", "d",
              "dtype", "created", "msae_version", "content_hash")
_HASH_ROWS = 65536


@dataclass(frozen=True)
class CacheInfo:
    """The schema metadata of a cache (all values as documented in docs/cache-format.md)."""
    model: str
    pretrained: str
    modality: str
    source: str
    split: str
    n: int
    d: int
    dtype: str
    created: str
    msae_version: str
    content_hash: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class FeatureCache:
    path: Path
    info: CacheInfo
    embeddings: np.ndarray  # (N, d) float32, read-only; a view of the mapped file when stored as float32
    table: pa.Table  # id (and text) columns, memory-mapped

    @property
    def ids(self) -> list[str]:
        return self.table.column(ID).to_pylist()

    @property
    def texts(self) -> list[str] | None:
        return self.table.column(TEXT).to_pylist() if TEXT in self.table.column_names else None

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        """The optional 0/1 attribute columns (int8), by name; empty when there are none."""
        return {f.name: self.table.column(f.name).to_numpy() for f in self.table.schema
                if pa.types.is_int8(f.type)}

    @property
    def labels(self) -> list[str] | None:
        """The optional class label of every row (e.g. an ImageFolder class), or None."""
        return self.table.column(LABEL).to_pylist() if LABEL in self.table.column_names else None


def is_cache(path: str | os.PathLike) -> bool:
    """Whether the file starts with the Arrow IPC file magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def content_hash(embeddings: np.ndarray, ids: Sequence[str], texts: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, attributes: dict[str, np.ndarray] | None = None) -> str:
    """SHA-256 over shape, stored dtype, the embedding bytes (little-endian, row-major), ids, texts
    and, when present, labels and attribute columns (so a cache without them keeps the hash it
    always had)."""
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}|{embeddings.shape[0]}|{embeddings.shape[1]}|"
                       f"{embeddings.dtype.name}\n".encode())
    for s in range(0, embeddings.shape[0], _HASH_ROWS):
        h.update(np.ascontiguousarray(embeddings[s:s + _HASH_ROWS], dtype=embeddings.dtype.newbyteorder("<")).data)
    for column in (ids, texts or ()) + ((labels,) if labels is not None else ()):
        h.update(b"\x1e")
        for v in column:
            h.update(v.encode("utf-8") + b"\x00")
    for name, values in (attributes or {}).items():
        h.update(b"\x1e" + name.encode("utf-8") + b"\x00" + np.ascontiguousarray(values, dtype=np.int8).tobytes())
    return "sha256:" + h.hexdigest()


def check_attribute(name: str, values, n: int, where) -> np.ndarray:
    """An attribute column as int8 0/1 (CelebA's -1/1 accepted and mapped to 0/1)."""
    if not isinstance(name, str) or not name or name in (EMBEDDING, ID, TEXT, LABEL):
        raise MsaeError(f"{where}: attribute name {name!r} is empty or a reserved column name")
    v = np.asarray(values)
    if v.shape != (n,):
        raise MsaeError(f"{where}: attribute {name!r} has {v.size} values; expected {n} (one per row)")
    uniq = set(np.unique(v).tolist())
    if uniq <= {-1, 1}:
        v = (v > 0)
    elif not uniq <= {0, 1}:
        raise MsaeError(f"{where}: attribute {name!r} holds {sorted(uniq)[:4]}; expected 0/1 (or -1/1) values")
    return v.astype(np.int8)


def created_now() -> str:
    """UTC creation time; SOURCE_DATE_EPOCH (reproducible-builds convention) overrides the clock."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = float(epoch) if epoch else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def write_cache(path: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str], *,
                model: str, pretrained: str, modality: str, source: str, split: str = "train",
                texts: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                attributes: dict[str, np.ndarray] | None = None, dtype: str = "float32", created: str | None = None,
                extra: dict[str, Any] | None = None, verify: bool = False) -> CacheInfo:
    """Write a cache atomically (temporary file in the same folder, then rename). Any size: the
    IPC writer's 64-bit option lets one record batch hold more than 2^31 - 1 values (the CC3M
    ViT-L/14 cache has 2.2 billion). ``verify``: re-open the written file and check its content
    hash before it is renamed into place."""
    from msae.version import __version__

    path = Path(path)
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise MsaeError(f"{path}: expected (N, d) embeddings with N, d >= 1, got shape {list(embeddings.shape)}")
    if dtype not in DTYPES:
        raise MsaeError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if modality not in MODALITIES:
        raise MsaeError(f"modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")
    n, d = embeddings.shape
    if len(ids) != n or (texts is not None and len(texts) != n):
        raise MsaeError(f"{path}: {n} embeddings but {len(ids)} ids" + ("" if texts is None else f" and {len(texts)} texts"))
    if labels is not None and len(labels) != n:
        raise MsaeError(f"{path}: {n} embeddings but {len(labels)} labels")
    if labels is not None and any(not isinstance(v, str) or not v for v in labels):
        bad = next(i for i, v in enumerate(labels) if not isinstance(v, str) or not v)
        raise MsaeError(f"{path}: row {bad} (id {ids[bad]!r}) has no label; expected a non-empty label for every row")
    attributes = {k: check_attribute(k, v, n, path) for k, v in (attributes or {}).items()}
    check_embeddings(embeddings, f"{path}", dtype)
    with atomic.new_file(path) as tmp:
        staging = None
        try:
            stored = embeddings
            if dtype == "float16" or embeddings.dtype != np.float32:
                staging = tmp.with_suffix(".stage")
                stored = np.memmap(staging, dtype=np.dtype(dtype), mode="w+", shape=(n, d))
                for s in range(0, n, _HASH_ROWS):
                    stored[s:s + _HASH_ROWS] = embeddings[s:s + _HASH_ROWS]
            info = CacheInfo(model=model, pretrained=pretrained, modality=modality, source=source, split=split,
                             n=n, d=d, dtype=dtype, created=created or created_now(), msae_version=__version__,
                             content_hash=content_hash(stored, ids, texts, labels, attributes),
                             extra=dict(extra or {}))
            values = pa.array(np.asarray(stored).reshape(-1))
            columns = [pa.FixedSizeListArray.from_arrays(values, d), pa.array(list(ids), type=pa.string())]
            names = [EMBEDDING, ID]
            if texts is not None:
                columns.append(pa.array(list(texts), type=pa.string()))
                names.append(TEXT)
            if labels is not None:
                columns.append(pa.array(list(labels), type=pa.string()))
                names.append(LABEL)
            for name, values in attributes.items():
                columns.append(pa.array(values, type=pa.int8()))
                names.append(name)
            meta = {k: str(v) for k, v in info.to_dict().items() if k != "extra"}
            meta.update(format=FORMAT, format_version=FORMAT_VERSION, extra=json.dumps(info.extra, sort_keys=True))
            if attributes:
                meta["attributes"] = json.dumps(list(attributes))
            batch = pa.RecordBatch.from_arrays(columns, names=names)
            schema = batch.schema.with_metadata(meta)
            options = pa.ipc.IpcWriteOptions(allow_64bit=True)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
                writer.write_batch(batch.replace_schema_metadata(meta))
            del values, columns, batch
        finally:
            if staging is not None:
                staging.unlink(missing_ok=True)
        if verify:
            written = open_cache(tmp, check_finite=False, verify=True)
            if (written.info.n, written.info.d) != (n, d):
                raise MsaeError(f"{path}: the written file holds {written.info.n}x{written.info.d}, expected {n}x{d}")
            del written
    return info


def open_input_cache(path: str | os.PathLike, what: str, expect_dim: int | None = None,
                     labelled: bool = False) -> FeatureCache:
    """:func:`open_cache` for a named input (a command-line option or a spec key): every error
    starts with ``what`` and the path; a file that is not a feature cache, or (``labelled``) a
    cache without a label column, is refused."""
    if not Path(path).is_file():
        raise MsaeError(f"{what} {path}: no such file; expected a feature cache (.arrow) file")
    if not is_cache(path):
        raise MsaeError(f"{what} {path}: expected a feature cache (.arrow) file")
    try:
        cache = open_cache(path, expect_dim=expect_dim)
    except MsaeError as e:
        raise MsaeError(f"{what}: {e}") from e
    if labelled and cache.labels is None:
        raise MsaeError(f"{what} {path}: has no label column; expected a labelled cache (docs/cache-format.md)")
    return cache


def open_cache(path: str | os.PathLike, expect_dim: int | None = None, check_finite: bool = True,
               verify: bool = False) -> FeatureCache:
    """Open and validate a cache; ``verify`` also recomputes the content hash (reads everything)."""
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"{p}: no such file")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(p), "r"))
        if reader.num_record_batches != 1:
            raise MsaeError(f"{p}: expected exactly one record batch, found {reader.num_record_batches}")
        batch = reader.get_batch(0)
    except (pa.ArrowException, OSError) as e:
        raise MsaeError(f"{p}: truncated or corrupt Arrow file ({str(e).splitlines()[0]})") from e
    info = _read_info(p, batch.schema)
    col = batch.column(EMBEDDING)
    if col.null_count or col.values.null_count:
        raise MsaeError(f"{p}: the embedding column has null entries; expected none")
    if (batch.num_rows, col.type.list_size) != (info.n, info.d):
        raise MsaeError(f"{p}: metadata says {info.n}x{info.d}, the data is {batch.num_rows}x{col.type.list_size}")
    values = col.values.slice(col.offset * info.d, info.n * info.d)
    try:
        flat = values.to_numpy(zero_copy_only=True)
    except pa.ArrowException as e:
        raise MsaeError(f"{p}: embedding values cannot be mapped ({e})") from e
    emb = flat.reshape(info.n, info.d)
    if verify:
        ids = batch.column(ID).to_pylist()
        texts = batch.column(TEXT).to_pylist() if TEXT in batch.schema.names else None
        labels = batch.column(LABEL).to_pylist() if LABEL in batch.schema.names else None
        attrs = {f.name: batch.column(f.name).to_numpy() for f in batch.schema if pa.types.is_int8(f.type)}
        actual = content_hash(emb, ids, texts, labels, attrs)
        if actual != info.content_hash:
            raise MsaeError(f"{p}: content hash mismatch (metadata {info.content_hash}, data {actual}); "
                            "the file is corrupt")
    if emb.dtype != np.float32:
        emb = emb.astype(np.float32)
    emb.flags.writeable = False
    if expect_dim is not None and info.d != expect_dim:
        raise MsaeError(f"{p}: expected embeddings of dimension {expect_dim}, got {info.d}")
    if check_finite:
        bad = first_nonfinite_row(emb)
        if bad is not None:
            raise MsaeError(f"{p}: row {bad} contains NaN or Inf; expected finite embeddings")
    table = pa.Table.from_batches([batch.drop_columns([EMBEDDING])])
    return FeatureCache(p, info, emb, table)


def cache_info(path: str | os.PathLike) -> CacheInfo:
    """The metadata of a cache, read from its schema only (no data is touched)."""
    p = Path(path)
    try:
        schema = pa.ipc.open_file(pa.memory_map(str(p), "r")).schema
    except (pa.ArrowException, OSError) as e:
        raise MsaeError(f"{p}: truncated or corrupt Arrow file ({str(e).splitlines()[0]})") from e
    return _read_info(p, schema)


def _read_info(p: Path, schema: pa.Schema) -> CacheInfo:
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if meta.get("format") != FORMAT:
        raise MsaeError(f"{p}: not an msae feature cache (schema metadata format={meta.get('format')!r}, "
                        f"expected {FORMAT!r}); import other files with `msae import-features`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MsaeError(f"{p}: cache format version {meta.get('format_version')!r}; this msae reads {FORMAT_VERSION!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise MsaeError(f"{p}: schema metadata lacks {', '.join(missing)}")
    names = schema.names
    if EMBEDDING not in names or ID not in names:
        raise MsaeError(f"{p}: expected columns {EMBEDDING!r} and {ID!r}, found {names}")
    et, it = schema.field(EMBEDDING).type, schema.field(ID).type
    if not pa.types.is_fixed_size_list(et) or str(et.value_type) not in ("float", "halffloat"):
        raise MsaeError(f"{p}: column {EMBEDDING!r} has type {et}; expected fixed_size_list<float32 or float16>[d]")
    if not pa.types.is_string(it) or any(c in names and not pa.types.is_string(schema.field(c).type)
                                         for c in (TEXT, LABEL)):
        raise MsaeError(f"{p}: columns {ID!r}, {TEXT!r} and {LABEL!r} must be strings")
    stored = "float16" if str(et.value_type) == "halffloat" else "float32"
    if meta["dtype"] != stored:
        raise MsaeError(f"{p}: metadata dtype {meta['dtype']!r} disagrees with the stored {stored}")
    try:
        n, d = int(meta["n"]), int(meta["d"])
        extra = json.loads(meta.get("extra", "{}"))
    except ValueError as e:
        raise MsaeError(f"{p}: malformed schema metadata ({e})") from e
    return CacheInfo(model=meta["model"], pretrained=meta["pretrained"], modality=meta["modality"],
                     source=meta["source"], split=meta["split"], n=n, d=d, dtype=stored, created=meta["created"],
                     msae_version=meta["msae_version"], content_hash=meta["content_hash"], extra=extra)

