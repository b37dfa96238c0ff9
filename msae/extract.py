"""``msae extract``: embed images or texts with an open_clip model into a feature cache.

Resumable: work goes to ``OUT.partial/`` (raw float32 rows, a JSON-lines row file and a state file
rewritten atomically after every batch). Started again with the same arguments, an extraction
truncates the raw files to the last recorded batch and continues; the finished cache is the same
file as an uninterrupted run's (bit-identical when the creation time is pinned by SOURCE_DATE_EPOCH).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from msae import atomic
from msae.cache import created_now, write_cache
from msae.errors import MsaeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".csv", ".parquet")
STATE = "state.json"
RAW = "embeddings.f32"
ROWS = "rows.jsonl"


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class ImageItem:
    id: str
    path: str  # file, or tar shard
    member: str | None = None  # member name inside a tar shard


def _expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style ``{000..009}`` ranges and ``{a,b}`` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        opts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        opts = body.split(",")
    return [p for o in opts for p in _expand_braces(pattern[:m.start()] + o + pattern[m.end():])]


def list_images(spec: str) -> list[ImageItem]:
    """Images under a folder (recursive, sorted by relative path), or the image members of tar shards
    given as a file, a brace range (``shards-{000..009}.tar``) or a glob, in shard then member order."""
    root = Path(spec)
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p.relative_to(root).as_posix())
        items = [ImageItem(p.relative_to(root).as_posix(), str(p)) for p in files]
        if not items:
            raise MsaeError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in this folder")
        return items
    shards = sorted({s for p in _expand_braces(spec) for s in (glob.glob(p) or ([p] if Path(p).exists() else []))})
    if not shards:
        raise MsaeError(f"--images {spec}: expected a folder of images or .tar shards (file, {{000..009}} range "
                        "or glob); nothing matches")
    items = []
    for shard in shards:
        try:
            with tarfile.open(shard, "r:*") as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            raise MsaeError(f"{shard}: unreadable tar shard ({e})") from e
        items += [ImageItem(f"{Path(shard).name}/{n}", shard, n) for n in names
                  if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise MsaeError(f"--images {spec}: the tar shards hold no image members")
    return items


def read_texts(path: str, column: str | None) -> list[str]:
    """Texts from a .txt (one per line), or a column of a .csv or .parquet file."""
    p = Path(path)
    if not p.is_file():
        raise MsaeError(f"--texts {p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            return p.read_text(encoding="utf-8").splitlines()
        if suffix == ".csv":
            import pyarrow.csv as pcsv
            table = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(p)
        else:
            raise MsaeError(f"--texts {p}: expected a {', '.join(TEXT_SUFFIXES)} file")
    except UnicodeDecodeError as e:
        raise MsaeError(f"--texts {p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except MsaeError:
        raise
    except Exception as e:  # pyarrow reader errors
        raise MsaeError(f"--texts {p}: unreadable ({str(e).splitlines()[0]})") from e
    names = table.column_names
    if column is None:
        column = "text" if "text" in names else (names[0] if len(names) == 1 else None)
        if column is None:
            raise MsaeError(f"--texts {p}: several columns {names}; choose one with --text-column")
    if column not in names:
        raise MsaeError(f"--text-column {column!r}: not a column of {p} (columns: {names})")
    return ["" if v is None else str(v) for v in table.column(column).to_pylist()]


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[ImageItem], transform: Callable, start: int):
        self.items, self.transform, self.start = items, transform, start
        self._tars: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items) - self.start

    def _bytes(self, it: ImageItem) -> io.BytesIO | str:
        if it.member is None:
            return it.path
        tf = self._tars.get(it.path) or self._tars.setdefault(it.path, tarfile.open(it.path, "r:*"))
        return io.BytesIO(tf.extractfile(it.member).read())

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        from PIL import Image
        it = self.items[self.start + i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(self._bytes(it)) as img:
                    img.load()
                    return it.id, self.transform(img.convert("RGB")), None
        except Exception as e:  # PIL raises many types for bad files; each is reported, none is fatal
            return it.id, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    return batch


# ---------------------------------------------------------------- model

def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(model: str, pretrained: str, device: torch.device) -> tuple[Any, Callable, Callable, str, str]:
    """(model, image transform, tokenizer, model name, pretrained record) for an open_clip name or config JSON,
    with weights from an open_clip tag (downloaded by open_clip) or a local file."""
    import open_clip

    name = model
    if model.endswith(".json"):
        cfg = Path(model)
        if not cfg.is_file():
            raise MsaeError(f"--model {model}: no such model-config file")
        try:
            spec = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MsaeError(f"--model {model}: not valid JSON ({e})") from e
        if not isinstance(spec, dict) or "vision_cfg" not in spec or "text_cfg" not in spec:
            raise MsaeError(f"--model {model}: expected an open_clip model config with embed_dim, vision_cfg, text_cfg")
        open_clip.add_model_config(cfg)
        name = cfg.stem
    elif name not in open_clip.list_models():
        raise MsaeError(f"--model {model}: not an open_clip model name or a model-config .json file "
                        "(see open_clip.list_models())")
    weights = Path(pretrained)
    if weights.is_file():
        record = f"file:{weights.name}:sha256:{file_sha256(weights)}"
    elif any(c in pretrained for c in "/\\") or weights.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise MsaeError(f"--pretrained {pretrained}: no such weights file")
    else:
        record = pretrained
    try:
        net, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                  weights_only=True, require_pretrained=True)
    except Exception as e:  # torch, safetensors, zipfile and pickle each raise their own type for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise MsaeError(f"--pretrained {pretrained}: cannot load weights for {name} ({type(e).__name__}: {first})") from e
    net.eval()
    return net, transform, open_clip.get_tokenizer(name), name, record


# ---------------------------------------------------------------- the resumable run

@dataclass
class _State:
    key: str
    created: str
    inputs_done: int = 0
    rows: int = 0
    raw_bytes: int = 0
    rows_bytes: int = 0
    skipped: list = None  # [[id, reason], ...]

    def save(self, folder: Path) -> None:
        atomic.write_json(folder / STATE, self.__dict__)


def _open_partial(part: Path, key: str) -> _State:
    state_file = part / STATE
    if state_file.is_file():
        try:
            st = _State(**json.loads(state_file.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise MsaeError(f"{state_file}: unreadable resume state ({e}); delete {part} to start over") from e
        if st.key != key:
            raise MsaeError(f"{part}: an unfinished extraction with different arguments is here; rerun it with "
                            "the same arguments to resume, or delete this folder")
        for name, size in ((RAW, st.raw_bytes), (ROWS, st.rows_bytes)):
            with open(part / name, "r+b") as f:  # drop a batch that was cut off mid-write
                f.truncate(size)
        return st
    part.mkdir(parents=True, exist_ok=True)
    (part / RAW).write_bytes(b"")
    (part / ROWS).write_bytes(b"")
    st = _State(key=key, created=created_now(), skipped=[])
    st.save(part)
    return st


def extract(model: str, pretrained: str, out: str | os.PathLike, *, images: str | None = None,
            texts: str | None = None, text_column: str | None = None, batch_size: int = 256,
            workers: int = 2, device: str = "auto", dtype: str = "float32", split: str = "train",
            overwrite: bool = False, progress: bool = True, labels: str | None = None,
            attributes: str | None = None) -> dict[str, Any]:
    """Run (or resume) one extraction; returns a summary. Image rows get a ``label`` from ``labels``
    (a CSV id,label) or else from their class folder (first folder level under an image folder);
    ``attributes`` (a CSV id,A,B,...) adds 0/1 attribute columns."""
    from msae.labels import (attributes_for, folder_labels, labels_for, read_attributes,
                             read_labels)
    from tqdm import tqdm

    from msae.data import pick_device

    out = Path(out)
    if (images is None) == (texts is None):
        raise MsaeError("give one of --images DIR|SHARDS and --texts FILE")
    if batch_size < 1:
        raise MsaeError(f"--batch-size: expected a positive integer, got {batch_size}")
    if out.exists() and not overwrite:
        raise MsaeError(f"--out {out}: exists; choose another path or pass --overwrite")
    dev = pick_device(device)
    if images is not None:
        items: list = list_images(images)
        ids = [it.id for it in items]
        modality, source = "image", str(images)
    else:
        items = read_texts(texts, text_column)
        if not items:
            raise MsaeError(f"--texts {texts}: holds no texts")
        ids = [str(i) for i in range(len(items))]
        modality, source = "text", str(texts)
    # labels and attributes are checked against every input before any work, and applied on write
    if labels is not None:
        label_of = dict(zip(ids, labels_for(ids, read_labels(labels), "--labels")))
    elif images is not None and Path(images).is_dir():
        tops, why = folder_labels(ids)
        label_of = None if tops is None else dict(zip(ids, tops))
        if why and any("/" in i for i in ids):  # a class-folder tree with strays: say why there are no labels
            print(f"msae extract: no label column: {why} (give --labels FILE.csv)", file=sys.stderr)
    else:
        label_of = None
    attr_tables = read_attributes(attributes) if attributes is not None else {}
    attributes_for(ids, attr_tables, "--attributes")
    net, transform, tokenizer, name, record = load_model(model, pretrained, dev)
    amp = dev.type == "cuda"
    # what the extracted values depend on (not --dtype or --split: they only matter when the cache is written)
    h = hashlib.sha256(json.dumps([name, record, modality, batch_size, dev.type]).encode())
    for v in ids if images is not None else items:
        h.update(v.encode("utf-8") + b"\x00")
    key = h.hexdigest()
    part = out.with_name(out.name + ".partial")
    st = _open_partial(part, key)
    d = None
    bar = tqdm(total=len(items), initial=st.inputs_done, unit="img" if modality == "image" else "text",
               disable=not progress, dynamic_ncols=True, desc=f"extract {name}")
    with open(part / RAW, "ab") as raw, open(part / ROWS, "ab") as rows, torch.inference_mode():
        for batch in _batches(items, st.inputs_done, batch_size, transform, workers, modality):
            good = [(i, t) for i, t, err in batch if err is None]
            st.skipped += [[i, err] for i, _, err in batch if err is not None]
            if good:
                if modality == "image":
                    x = torch.stack([t for _, t in good]).to(dev)
                    encode = net.encode_image
                else:
                    x = tokenizer([t for _, t in good]).to(dev)
                    encode = net.encode_text
                with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                    emb = encode(x).float().cpu().numpy()
                if not np.isfinite(emb).all():
                    raise MsaeError(f"{model}: the model returned NaN/Inf embeddings for batch at input "
                                    f"{st.inputs_done}; check the weights")
                d = emb.shape[1]
                raw.write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
                for (i, t) in good:
                    row = {"id": i} if modality == "image" else {"id": i, "text": t}
                    rows.write((json.dumps(row) + "\n").encode())
            raw.flush(); rows.flush()
            os.fsync(raw.fileno()); os.fsync(rows.fileno())
            st.inputs_done += len(batch)
            st.rows += len(good)
            st.raw_bytes, st.rows_bytes = raw.tell(), rows.tell()
            st.save(part)
            bar.update(len(batch))
    bar.close()
    if st.rows == 0:
        raise MsaeError(f"{images or texts}: no input could be read ({len(st.skipped)} skipped); nothing written")
    width = d or st.raw_bytes // 4 // st.rows  # resumed after the last batch: width from the raw file
    emb = np.memmap(part / RAW, dtype="<f4", mode="r", shape=(st.rows, width))
    recs = [json.loads(line) for line in (part / ROWS).read_text().splitlines()]
    extra = {"skipped": len(st.skipped), "skipped_ids": [s[0] for s in st.skipped], "batch_size": batch_size,
             "device": dev.type, "precision": "fp16-autocast" if amp else "fp32",
             "open_clip_version": _open_clip_version(), "normalized": False}
    try:  # the partial state stays until the written cache verifies: a failed write loses no work
        kept = [r["id"] for r in recs]
        info = write_cache(out, emb, kept, model=name, pretrained=record, modality=modality,
                           source=source, split=split, texts=[r["text"] for r in recs] if modality == "text" else None,
                           labels=None if label_of is None else [label_of[i] for i in kept],
                           attributes=attributes_for(kept, attr_tables, "--attributes"),
                           dtype=dtype, created=st.created, extra=extra, verify=True)
    except (MsaeError, OSError) as e:
        raise MsaeError(f"{e}; the {st.rows} extracted embeddings are kept in {part}: run the command again "
                        "(--dtype and --split may change) to write the cache without extracting again") from e
    del emb
    shutil.rmtree(part)
    if st.skipped:
        shown = "; ".join(f"{i} ({e})" for i, e in st.skipped[:5])
        print(f"msae extract: skipped {len(st.skipped)} unreadable input(s): {shown}"
              + (" ..." if len(st.skipped) > 5 else ""), file=sys.stderr)
    return {"out": str(out), "rows": info.n, "d": info.d, "skipped": len(st.skipped), "model": name,
            "pretrained": record, "modality": modality}


def _open_clip_version() -> str:
    import open_clip
    return getattr(open_clip, "__version__", "unknown")


def _batches(items: Sequence, start: int, batch_size: int, transform: Callable, workers: int, modality: str):
    """Batches of (id, tensor-or-text, error) in input order, starting at input ``start``."""
    if modality == "text":
        for s in range(start, len(items), batch_size):
            yield [(str(i), items[i], None) for i in range(s, min(s + batch_size, len(items)))]
        return
    ds = _ImageDataset(items, transform, start)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate)
    yield from loader
