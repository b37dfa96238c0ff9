"""Row labels and attributes for feature caches, from an image folder tree or from CSV files."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from msae.errors import MsaeError


def folder_labels(ids: Sequence[str]) -> tuple[list[str] | None, str | None]:
    """ImageFolder convention: each id's first path component (``cat/001.jpg`` -> ``cat``). Returns
    (labels, None), or (None, why) when some image lies directly in the root (no class folder)."""
    bad = next((i for i in ids if "/" not in i), None)
    if bad is not None:
        return None, f"{bad!r} lies directly in the image folder, not in a class subfolder"
    return [i.split("/", 1)[0] for i in ids], None


def _read_csv(path: str, option: str) -> tuple[list[str], list[list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"{option} {path}: no such file")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MsaeError(f"{option} {path}: unreadable CSV ({e})") from e
    if len(rows) < 2 or rows[0][0].strip() != "id":
        raise MsaeError(f"{option} {path}: expected a header row starting with 'id' and at least one data row")
    width = len(rows[0])
    bad = next((n for n, r in enumerate(rows[1:], 2) if len(r) != width), None)
    if bad is not None:
        raise MsaeError(f"{option} {path}: line {bad} has {len(rows[bad - 1])} fields; expected {width}")
    return [h.strip() for h in rows[0]], [[v.strip() for v in r] for r in rows[1:]]


def read_labels(path: str) -> dict[str, str]:
    """id -> label from a CSV with columns id,label."""
    header, rows = _read_csv(path, "--labels")
    if header[:2] != ["id", "label"] or len(header) != 2:
        raise MsaeError(f"--labels {path}: expected the columns id,label, got {','.join(header)}")
    return {r[0]: r[1] for r in rows if r[1]}


def read_attributes(path: str) -> dict[str, dict[str, int]]:
    """name -> (id -> 0/1) from a CSV with an id column and one 0/1 (or CelebA's -1/1) column per attribute."""
    header, rows = _read_csv(path, "--attributes")
    if len(header) < 2:
        raise MsaeError(f"--attributes {path}: expected an id column and at least one attribute column")
    out: dict[str, dict[str, int]] = {}
    for c, name in enumerate(header[1:], 1):
        try:
            values = {r[0]: int(r[c]) for r in rows}
        except ValueError:
            raise MsaeError(f"--attributes {path}: column {name!r} holds a value that is not an integer; "
                            "expected 0/1 or -1/1") from None
        out[name] = values
    return out


def labels_for(ids: Sequence[str], table: dict[str, str], option: str) -> list[str]:
    missing = next((i for i in ids if i not in table), None)
    if missing is not None:
        raise MsaeError(f"{option}: no label for id {missing!r}; expected one for every row")
    return [table[i] for i in ids]


def attributes_for(ids: Sequence[str], tables: dict[str, dict[str, int]], option: str) -> dict[str, np.ndarray]:
    out = {}
    for name, table in tables.items():
        missing = next((i for i in ids if i not in table), None)
        if missing is not None:
            raise MsaeError(f"{option}: attribute {name!r} has no value for id {missing!r}")
        out[name] = np.array([table[i] for i in ids])
    return out
