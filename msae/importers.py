"""``msae import-features``: turn embeddings made elsewhere into a feature cache.

Sources: the reference code's headerless float32 files (``..._{N}_{D}.npy``), plain ``.npy``,
and Parquet or Arrow (IPC file or stream) tables with a list or fixed-size-list column. Arrays
are memory-mapped and tables are read batch by batch into a float32 staging file beside the
output, so memory stays bounded at any size (the CC3M ViT-L/14 train set is 8.9 GB).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msae import atomic
from msae.arrays import check_embeddings
from msae.cache import CacheInfo, write_cache
from msae.data import load_array
from msae.errors import MsaeError


@contextmanager
def _open_batches(path: Path) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """The schema and record batches of a Parquet file or an Arrow IPC file/stream, streamed."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(path)
            yield pf.schema_arrow, pf.iter_batches(batch_size=65536)
            return
        with pa.memory_map(str(path), "r") as src:
            try:
                file_reader = pa.ipc.open_file(src)
            except pa.ArrowInvalid:
                file_reader = None
                src.seek(0)
            if file_reader is not None:
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
                yield file_reader.schema, batches
            else:
                stream_reader = pa.ipc.open_stream(src)
                yield stream_reader.schema, iter(stream_reader)
    except (pa.ArrowException, OSError) as e:
        raise MsaeError(f"{path}: unreadable table ({str(e).splitlines()[0]})") from e


def _vector_column(path: Path, schema: pa.Schema, column: str | None) -> str:
    vec = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)
           or pa.types.is_large_list(f.type)]
    if column is not None:
        if column not in schema.names:
            raise MsaeError(f"--column {column!r}: not a column of {path} (columns: {schema.names})")
        if column not in vec:
            raise MsaeError(f"--column {column!r} of {path} has type {schema.field(column).type}; "
                            "expected a list or fixed-size list of floats")
        return column
    if len(vec) != 1:
        raise MsaeError(f"{path}: expected one list column of embeddings, found {vec or 'none'}; choose with --column")
    return vec[0]


def _batch_embeddings(path: Path, col: pa.Array, name: str, start: int, d: int | None) -> np.ndarray:
    """(rows, d) float32 of one batch of a list column; every row must have the same length."""
    if col.null_count:
        row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise MsaeError(f"{path}: column {name!r} row {row} is null; expected an embedding in every row")
    if not pa.types.is_floating(col.type.value_type) and not pa.types.is_integer(col.type.value_type):
        raise MsaeError(f"{path}: column {name!r} holds {col.type.value_type}; expected floats")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    width = d if d is not None else (int(lengths[0]) if len(lengths) else 0)
    if width < 1 or (lengths != width).any():
        row = int(np.flatnonzero(lengths != width)[0]) if width >= 1 else 0
        raise MsaeError(f"{path}: column {name!r} row {start + row} has {int(lengths[row])} values, row 0 "
                        f"has {width}; expected equal-length embeddings")
    values = pc.list_flatten(col)
    if values.null_count:
        raise MsaeError(f"{path}: column {name!r} has null values inside embeddings (rows {start}..{start + len(col) - 1})")
    arr = values.to_numpy(zero_copy_only=False).reshape(len(col), width)
    try:
        check_embeddings(arr, str(path), "float32")
    except MsaeError as e:  # name the row of the whole table, not of this batch
        msg = str(e)
        if " row " in msg:
            head, rest = msg.split(" row ", 1)
            row, tail = rest.split(" ", 1)
            raise MsaeError(f"{head} row {start + int(row)} {tail}") from None
        raise
    return arr.astype(np.float32, copy=False)


def _named_column(path: Path, schema: pa.Schema, name: str | None, default: str, option: str) -> str | None:
    """The column given with ``option`` (an error when missing), else ``default`` when present."""
    if name is None:
        return default if default in schema.names else None
    if name not in schema.names:
        raise MsaeError(f"{option} {name}: no such column in {path} (columns: {', '.join(schema.names)})")
    return name


def _stage_table(path: Path, column: str | None, staging: Path, id_column: str | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 attribute_columns: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, Any]]:
    """Copy a table's embeddings into a float32 file ``staging``, batch by batch; returns a
    memory-mapped (N, d) view of it and the other columns present or asked for (ids, texts, labels,
    attributes)."""
    rows, d = 0, None
    with _open_batches(path) as (schema, batches), open(staging, "wb") as out:
        name = _vector_column(path, schema, column)
        id_col = _named_column(path, schema, id_column, "id", "--id-column")
        text_col = _named_column(path, schema, text_column, "text", "--text-column")
        if text_column is None and text_col is not None and not pa.types.is_string(schema.field(text_col).type):
            text_col = None
        label_col = _named_column(path, schema, label_column, "", "--label-column") if label_column else None
        for a in attribute_columns:
            _named_column(path, schema, a, "", "--attribute-columns")
        cols: dict[str, list] = {k: [] for k, c in (("ids", id_col), ("texts", text_col), ("labels", label_col))
                                 if c is not None}
        attrs: dict[str, list] = {a: [] for a in attribute_columns}
        for batch in batches:
            if batch.num_rows == 0:
                continue
            emb = _batch_embeddings(path, batch.column(name), name, rows, d)
            d = emb.shape[1]
            out.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
            if id_col is not None:
                cols["ids"] += [str(v) for v in batch.column(id_col).to_pylist()]
            if text_col is not None:
                cols["texts"] += ["" if v is None else str(v) for v in batch.column(text_col).to_pylist()]
            if label_col is not None:
                cols["labels"] += ["" if v is None else str(v) for v in batch.column(label_col).to_pylist()]
            for a in attribute_columns:
                values = batch.column(a).to_pylist()
                bad = next((v for v in values if not isinstance(v, (bool, int))), "ok")
                if bad != "ok":
                    raise MsaeError(f"--attribute-columns {a}: holds {bad!r}; expected integers 0/1 (or -1/1)")
                attrs[a] += [int(v) for v in values]
            rows += batch.num_rows
    if rows == 0 or d is None:
        raise MsaeError(f"{path}: the table has no rows")
    return np.memmap(staging, dtype="<f4", mode="r", shape=(rows, d)), {
        **cols, "attributes": {a: np.array(v) for a, v in attrs.items()}}


def import_features(src: str | os.PathLike, out: str | os.PathLike, *, column: str | None = None,
                    model: str = "unknown", pretrained: str = "unknown", modality: str = "image",
                    split: str = "train", dtype: str = "float32", overwrite: bool = False,
                    id_column: str | None = None, text_column: str | None = None, label_column: str | None = None,
                    attribute_columns: Sequence[str] = ()) -> CacheInfo:
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise MsaeError(f"{src}: no such file")
    if out.exists() and not overwrite:
        raise MsaeError(f"--out {out}: exists; choose another path or pass --overwrite")
    extra: dict[str, Any] = {}
    if src.suffix.lower() == ".npy":
        if id_column or text_column or label_column or attribute_columns:
            raise MsaeError(f"{src}: a .npy file has no columns; --id-column, --text-column, --label-column and "
                            "--attribute-columns need a Parquet or Arrow table")
        emb = load_array(src)
        extra["imported_from"] = "npy"
        return write_cache(out, emb, [str(i) for i in range(emb.shape[0])], model=model, pretrained=pretrained,
                           modality=modality, source=str(src), split=split, dtype=dtype, extra=extra)
    extra["imported_from"] = "parquet" if src.suffix.lower() == ".parquet" else "arrow"
    with atomic.scratch_file(out) as staging:
        emb, cols = _stage_table(src, column, staging, id_column, text_column, label_column, attribute_columns)
        ids = cols.get("ids") or [str(i) for i in range(emb.shape[0])]
        labels = cols.get("labels")
        if labels is not None and not all(labels):
            bad = next(i for i, v in zip(ids, labels) if not v)
            raise MsaeError(f"--label-column {label_column}: no label for id {bad!r}; expected one for every row")
        info = write_cache(out, emb, ids, model=model, pretrained=pretrained, modality=modality, source=str(src),
                           split=split, texts=cols.get("texts"), labels=labels, attributes=cols["attributes"],
                           dtype=dtype, extra=extra)
        del emb
    return info
