"""CLIP-like synthetic embeddings with a known hierarchical sparse dictionary (ground truth).

x = offset[modality] + sum_i a_i f_i + noise, where
- f_i are unit feature directions organised as a forest: each root has ``branching[0]`` children,
  each child ``branching[1]`` grandchildren, and so on; a child's direction leans towards its parent's;
- a child fires only when its parent fires; root frequencies follow a power law, and so do the
  conditional frequencies of siblings;
- magnitudes a_i are non-negative (exponential, shrinking with depth);
- every sample carries a large mean offset shared by its modality; the image-like and text-like
  offsets differ by a fixed gap (the CLIP modality gap);
- noise is Gaussian with a power-law spectrum in a random basis (anisotropic, like CLIP).
The world (dictionary, offsets, noise basis) depends on ``seed`` only; samples on ``sample_seed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msae.errors import MsaeError


@dataclass(frozen=True)
class GroundTruth:
    dictionary: np.ndarray  # (m, d) float32, unit rows
    level: np.ndarray  # (m,) int64, 0 for roots
    parent: np.ndarray  # (m,) int64, -1 for roots

    @property
    def depth(self) -> int:
        return int(self.level.max()) + 1

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save_file
        from msae.atomic import new_file
        with new_file(path) as tmp:
            save_file({"dictionary": self.dictionary, "level": self.level, "parent": self.parent}, str(tmp),
                      metadata={"format": "msae-synthetic-truth", "format_version": "1"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GroundTruth":
        from safetensors.numpy import load_file
        try:
            t = load_file(str(path))
            return cls(t["dictionary"].astype(np.float32), t["level"].astype(np.int64), t["parent"].astype(np.int64))
        except FileNotFoundError:
            raise MsaeError(f"{path}: no such ground-truth file") from None
        except Exception as e:  # safetensors raises its own error types; a file without our keys raises KeyError
            raise MsaeError(f"{path}: not a ground-truth file written by `msae synth` ({e})") from e


@dataclass(frozen=True)
class World:
    truth: GroundTruth
    offsets: dict[str, np.ndarray]  # modality -> (d,) mean offset
    noise_basis: np.ndarray  # (d, d) orthonormal
    noise_spectrum: np.ndarray  # (d,)
    root_freq: np.ndarray  # (roots,) firing probability
    child_freq: np.ndarray  # (m,) probability of firing given the parent fires (1 for roots)


@dataclass(frozen=True)
class SyntheticData:
    x: np.ndarray  # (N, d) float32
    codes: np.ndarray  # (N, m) float32 true non-negative codes
    truth: GroundTruth
    modality: str

    @property
    def dictionary(self) -> np.ndarray:
        return self.truth.dictionary

    @property
    def codes_l0(self) -> float:
        return float((self.codes > 0).sum(1).mean())


def _power_law(count: int, total: float, exponent: float, cap: float) -> np.ndarray:
    p = 1.0 / np.arange(1, count + 1) ** exponent
    return np.clip(p * total / p.sum(), 0.0, cap)


def make_world(d: int = 64, roots: int = 32, branching: tuple[int, ...] = (3, 2), active_roots: float = 3.0,
               child_rate: float = 1.0, parent_similarity: float = 0.4, offset_norm: float = 10.0,
               modality_gap: float = 4.0, noise: float = 0.05, exponent: float = 0.8, seed: int = 0) -> World:
    """The fixed part of a synthetic data set: dictionary, hierarchy, frequencies, offsets, noise shape."""
    if d < 2 or roots < 1 or any(b < 1 for b in branching):
        raise MsaeError(f"synthetic data: expected d >= 2, roots >= 1, branching >= 1, got d={d}, roots={roots}, "
                        f"branching={list(branching)}")
    rng = np.random.default_rng(seed)
    dirs = [rng.standard_normal((roots, d))]
    level, parent = [np.zeros(roots, np.int64)], [np.full(roots, -1, np.int64)]
    child_freq = [np.ones(roots)]
    dirs[0] /= np.linalg.norm(dirs[0], axis=1, keepdims=True)
    start = 0
    for depth, b in enumerate(branching, start=1):
        prev = dirs[-1]
        par = np.repeat(np.arange(prev.shape[0]), b)
        noise_dirs = rng.standard_normal((par.size, d))
        noise_dirs -= (noise_dirs * prev[par]).sum(1, keepdims=True) * prev[par]
        noise_dirs /= np.linalg.norm(noise_dirs, axis=1, keepdims=True)
        new = parent_similarity * prev[par] + np.sqrt(1 - parent_similarity ** 2) * noise_dirs
        dirs.append(new / np.linalg.norm(new, axis=1, keepdims=True))
        level.append(np.full(par.size, depth, np.int64))
        parent.append(par + start)
        child_freq.append(np.tile(_power_law(b, child_rate, exponent, 0.95), prev.shape[0]))
        start += prev.shape[0]
    truth = GroundTruth(np.concatenate(dirs).astype(np.float32), np.concatenate(level), np.concatenate(parent))
    base = rng.standard_normal(d)
    gap = rng.standard_normal(d)
    gap -= gap @ base / (base @ base) * base
    base *= offset_norm / np.linalg.norm(base)
    gap *= modality_gap / (2 * np.linalg.norm(gap))
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = noise * 2.0 / np.sqrt(np.arange(1, d + 1))
    return World(truth, {"image": base + gap, "text": base - gap}, basis, spectrum,
                 _power_law(roots, active_roots, exponent, 0.9), np.concatenate(child_freq))


def sample(world: World, n_samples: int, modality: str = "image", seed: int = 1) -> SyntheticData:
    """Draw samples; a child fires only where its parent fires."""
    if modality not in world.offsets:
        raise MsaeError(f"modality: expected one of {', '.join(world.offsets)}, got {modality!r}")
    if n_samples < 1:
        raise MsaeError(f"synthetic data: expected at least one sample, got {n_samples}")
    truth = world.truth
    rng = np.random.default_rng(seed)
    m, d = truth.dictionary.shape
    on = np.zeros((n_samples, m), dtype=bool)
    for lvl in range(truth.depth):  # parents are drawn before their children
        idx = np.flatnonzero(truth.level == lvl)
        p = world.root_freq if lvl == 0 else world.child_freq[idx]
        draw = rng.random((n_samples, idx.size)) < p
        on[:, idx] = draw if lvl == 0 else draw & on[:, truth.parent[idx]]
    mags = (rng.exponential(1.0, (n_samples, m)) + 0.1) * 0.8 ** truth.level
    codes = (mags * on).astype(np.float32)
    eps = rng.standard_normal((n_samples, d)) * world.noise_spectrum
    x = world.offsets[modality] + codes @ truth.dictionary + eps @ world.noise_basis.T
    return SyntheticData(x.astype(np.float32), codes, truth, modality)


def make_synthetic(n_samples: int = 20000, d: int = 64, roots: int = 32, branching: tuple[int, ...] = (3, 2),
                   active_roots: float = 3.0, modality: str = "image", seed: int = 0, sample_seed: int = 1,
                   **world_kwargs) -> SyntheticData:
    """One call: the world for ``seed`` and ``n_samples`` samples of one modality."""
    world = make_world(d=d, roots=roots, branching=branching, active_roots=active_roots, seed=seed, **world_kwargs)
    return sample(world, n_samples, modality, sample_seed)


def recovery_score(decoder: np.ndarray, truth: GroundTruth) -> dict[str, float]:
    """Mean over true features of the best cosine with any decoder row, overall and per hierarchy level."""
    dec = np.asarray(decoder, dtype=np.float64)
    if dec.ndim != 2 or dec.shape[1] != truth.dictionary.shape[1]:
        raise MsaeError(f"recovery: decoder rows have dimension {dec.shape[-1]}, the ground truth "
                        f"{truth.dictionary.shape[1]}")
    dec = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    best = np.empty(truth.dictionary.shape[0])
    for s in range(0, best.size, 1024):
        best[s:s + 1024] = (truth.dictionary[s:s + 1024].astype(np.float64) @ dec.T).max(1)
    out = {"recovery": float(best.mean())}
    for lvl in range(truth.depth):
        out[f"recovery_level{lvl}"] = float(best[truth.level == lvl].mean())
    return out


def feature_names(truth: GroundTruth) -> list[str]:
    """A name per true feature: roots r0, r1, ...; the j-th child of feature NAME is NAME.j."""
    names: list[str] = []
    siblings: dict[int, int] = {}
    for f, (lvl, par) in enumerate(zip(truth.level.tolist(), truth.parent.tolist())):
        if lvl == 0:
            names.append(f"r{f}")
        else:
            j = siblings.get(par, 0)
            siblings[par] = j + 1
            names.append(f"{names[par]}.{j}")
    return names


def row_labels(data: SyntheticData) -> list[str]:
    """Each row's label: the name of its strongest root feature ('none' where no root fires)."""
    roots = np.flatnonzero(data.truth.level == 0)
    names = feature_names(data.truth)
    codes = data.codes[:, roots]
    best = codes.argmax(1)
    return [names[roots[b]] if codes[i, b] > 0 else "none" for i, b in enumerate(best.tolist())]


def vocabulary(world: World, magnitude: float = 2.0) -> tuple[np.ndarray, list[str]]:
    """One text-like embedding per true feature (the text offset plus the feature's direction at
    ``magnitude``, as if its name were embedded), and the names."""
    x = world.offsets["text"] + magnitude * world.truth.dictionary.astype(np.float64)
    return x.astype(np.float32), feature_names(world.truth)


TRUTH_FILE = "truth.safetensors"
# The attribute column of the synthetic image caches: whether root feature r1 fires (for msae bias).
ATTRIBUTE, ATTRIBUTE_FEATURE = "has_r1", 1
VOCAB_FILE = "vocab.arrow"
SPLITS = {("image", "train"): 1, ("image", "val"): 2, ("text", "train"): 3, ("text", "val"): 4}


def synthetic_files(out: str | os.PathLike) -> dict[str, Path]:
    """The files ``msae synth --out DIR`` writes: DIR/{image,text}_{train,val}.arrow (image caches
    labelled), DIR/vocab.arrow and DIR/truth.safetensors."""
    out = Path(out)
    return ({f"{m}_{s}": out / f"{m}_{s}.arrow" for m, s in SPLITS}
            | {"vocab": out / VOCAB_FILE, "truth": out / TRUTH_FILE})


def write_synthetic(out_dir: str | os.PathLike, n_train: int = 20000, n_val: int = 4000, *, dtype: str = "float32",
                    overwrite: bool = False, **world_kwargs) -> dict[str, Path]:
    """Write the synthetic caches and ``truth.safetensors`` (see :func:`synthetic_files`).

    The folder may be new or empty; a folder holding files needs ``overwrite``, and even then only
    these files are replaced (each atomically, after all were made); nothing else in it is touched."""
    import json
    import shutil

    from msae.atomic import check_output_folder, temp_dir_beside
    from msae.cache import write_cache

    out = check_output_folder(out_dir, "--out", overwrite, "only the synthetic files")
    world = make_world(**world_kwargs)
    files = synthetic_files(out)
    tmp = temp_dir_beside(out)
    try:
        world.truth.save(tmp / TRUTH_FILE)
        params = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in world_kwargs.items()}, sort_keys=True)
        for (modality, split), sample_seed in SPLITS.items():
            data = sample(world, n_train if split == "train" else n_val, modality, sample_seed)
            write_cache(tmp / f"{modality}_{split}.arrow", data.x, [str(i) for i in range(data.x.shape[0])],
                        model="synthetic", pretrained="none", modality=modality, source=f"msae synth {params}",
                        split=split, dtype=dtype, labels=row_labels(data) if modality == "image" else None,
                        attributes={ATTRIBUTE: data.codes[:, ATTRIBUTE_FEATURE] > 0} if modality == "image" else None,
                        extra={"truth": TRUTH_FILE, "features": int(world.truth.dictionary.shape[0]),
                               "true_l0": data.codes_l0, "sample_seed": sample_seed})
        vocab, names = vocabulary(world)
        write_cache(tmp / VOCAB_FILE, vocab, names, texts=names, model="synthetic", pretrained="none",
                    modality="text", source=f"msae synth {params}", split="vocabulary", dtype=dtype,
                    extra={"truth": TRUTH_FILE})
        if not out.exists() or not any(out.iterdir()):
            os.replace(tmp, out)
        else:
            for path in files.values():
                os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files
