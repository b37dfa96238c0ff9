"""``msae import-features``: turn embeddings made elsewhere into a feature cache.

Sources: the reference code's headerless float32 files (``..._{N}_{D}.npy``), plain ``.npy``,
and Parquet or Arrow (IPC file or stream) tables with a list or fixed-size-list column.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msae.cache import CacheInfo, write_cache
from msae.data import first_nonfinite_row, load_array
from msae.errors import MsaeError


def read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path)
        with pa.memory_map(str(path), "r") as src:
            try:
                return pa.ipc.open_file(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_stream(src).read_all()
    except (pa.ArrowException, OSError) as e:
        raise MsaeError(f"{path}: unreadable table ({str(e).splitlines()[0]})") from None


def _vector_column(path: Path, table: pa.Table, column: str | None) -> str:
    vec = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)
           or pa.types.is_large_list(f.type)]
    if column is not None:
        if column not in table.column_names:
            raise MsaeError(f"--column {column!r}: not a column of {path} (columns: {table.column_names})")
        if column not in vec:
            raise MsaeError(f"--column {column!r} of {path} has type {table.schema.field(column).type}; "
                            "expected a list or fixed-size list of floats")
        return column
    if len(vec) != 1:
        raise MsaeError(f"{path}: expected one list column of embeddings, found {vec or 'none'}; choose with --column")
    return vec[0]


def table_embeddings(path: Path, table: pa.Table, column: str | None) -> np.ndarray:
    """An (N, d) float32 array from a list / fixed-size-list column; every row must have the same length."""
    name = _vector_column(path, table, column)
    col = table.column(name).combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise MsaeError(f"{path}: column {name!r} row {row} is null; expected an embedding in every row")
    if not pa.types.is_floating(col.type.value_type) and not pa.types.is_integer(col.type.value_type):
        raise MsaeError(f"{path}: column {name!r} holds {col.type.value_type}; expected floats")
    if len(col) == 0:
        raise MsaeError(f"{path}: the table has no rows")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    if d < 1 or (lengths != d).any():
        row = int(np.flatnonzero(lengths != d)[0]) if d >= 1 else 0
        raise MsaeError(f"{path}: column {name!r} row {row} has {int(lengths[row])} values, row 0 has {d}; "
                        "expected equal-length embeddings")
    values = pc.list_flatten(col)
    if values.null_count:
        raise MsaeError(f"{path}: column {name!r} has null values inside embeddings")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), d)


def import_features(src: str | os.PathLike, out: str | os.PathLike, *, column: str | None = None,
                    model: str = "unknown", pretrained: str = "unknown", modality: str = "image",
                    split: str = "train", dtype: str = "float32", overwrite: bool = False) -> CacheInfo:
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise MsaeError(f"{src}: no such file")
    if out.exists() and not overwrite:
        raise MsaeError(f"--out {out}: exists; choose another path or pass --overwrite")
    ids: list[str] | None = None
    texts: list[str] | None = None
    extra: dict[str, Any] = {}
    if src.suffix.lower() == ".npy":
        emb = load_array(src)
        extra["imported_from"] = "npy"
    else:
        table = read_table(src)
        emb = table_embeddings(src, table, column)
        bad = first_nonfinite_row(emb)
        if bad is not None:
            raise MsaeError(f"{src}: row {bad} contains NaN or Inf; expected finite embeddings")
        if "id" in table.column_names:
            ids = [str(v) for v in table.column("id").to_pylist()]
        if "text" in table.column_names and pa.types.is_string(table.schema.field("text").type):
            texts = ["" if v is None else v for v in table.column("text").to_pylist()]
        extra["imported_from"] = "parquet" if src.suffix.lower() == ".parquet" else "arrow"
    if ids is None:
        ids = [str(i) for i in range(emb.shape[0])]
    return write_cache(out, emb, ids, model=model, pretrained=pretrained, modality=modality, source=str(src),
                       split=split, texts=texts, dtype=dtype, extra=extra)
