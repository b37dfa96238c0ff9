"""The ``msae`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from msae.errors import MsaeError


def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise MsaeError(f"expected a comma-separated list of integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise MsaeError(f"expected a comma-separated list of numbers, got {s!r}") from None


def _summary(r: dict) -> str:
    """One line of the headline metrics of an evaluation entry."""
    return (f"fvu={r['fvu']:.4f} fvu_dataset={r['fvu_dataset']:.4f} cosine={r['cosine']:.4f} "
            f"l0={r['l0']:.1f} zero_fraction={r['zero_fraction']:.4f} dead={r['dead_fraction']:.3f}")


def _preprocessing_record(sae, tcfg) -> dict:
    return {"scaling": tcfg.scaling, "mean_center": tcfg.mean_center, "scale": float(sae.scale)}


def _check_out_free(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise MsaeError(f"{what} {path}: exists and is not a directory")


def cmd_train(a: argparse.Namespace) -> int:
    from msae import checkpoint
    from msae.config import DEFAULT_K, DEFAULT_LR, SAEConfig, TrainConfig, doubling_levels
    from msae.data import fingerprint, load_array
    from msae.evaluate import evaluate
    from msae.sae import create_sae
    from msae.train import DivergedError, fit

    out = Path(a.out)
    _check_out_free(out, "--out")
    train = load_array(a.data)
    d = train.shape[1]
    evals = {Path(p).stem: load_array(p, expect_dim=d) for p in (a.eval or [])}
    n = int(round(a.expansion * d))
    if n < 1:
        raise MsaeError(f"--expansion: expected a positive factor, got {a.expansion}")
    levels = None
    if a.method == "msae":
        if a.levels and a.levels_from:
            raise MsaeError("--levels and --levels-from: give one of them")
        levels = tuple(_int_list(a.levels)) if a.levels else doubling_levels(a.levels_from or min(64, n), n)
    alphas = tuple(_float_list(a.alphas)) if a.alphas else None
    cfg = SAEConfig(method=a.method, d=d, n=n, k=a.k if a.k is not None else DEFAULT_K.get(a.method),
                    levels=levels, alphas=alphas, weighting=a.weighting if alphas is None else None,
                    l1=a.l1, auxk=a.auxk)
    tcfg = TrainConfig(lr=a.lr if a.lr is not None else DEFAULT_LR[a.method], epochs=a.epochs,
                       batch_size=a.batch_size, seed=a.seed, loss=a.loss, scaling=a.scaling,
                       mean_center=not a.no_mean_center, device=a.device)
    sae = create_sae(cfg, tcfg.seed)
    log: list[dict] = []

    def on_epoch(rec, trainer):
        log.append(rec.flat())
        if evals and not a.quiet:
            summary = "; ".join(f"{name}: {_summary(r)}" for name, r in rec.eval.items())
            print(f"epoch {rec.epoch}: loss={rec.loss:.4f} {summary}", file=sys.stderr)

    try:
        fit(sae, train, tcfg, evals, on_epoch=on_epoch, progress=not a.quiet)
    except DivergedError as e:
        raise MsaeError(f"training diverged: {e}") from None
    final = {name: evaluate(sae, arr, batch_size=tcfg.batch_size)["own"] for name, arr in evals.items()}
    data_info = {"train": str(a.data), "rows": int(train.shape[0]), "fingerprint": fingerprint(train)}
    checkpoint.save(sae, out, train=tcfg.to_dict(), preprocessing=_preprocessing_record(sae, tcfg), data=data_info)
    checkpoint.write_json(out / "metrics.json", {"history": log, "final": final})
    print(f"saved {cfg.method} SAE ({d} -> {n}) to {out}", file=sys.stderr)
    for name, r in final.items():
        print(f"{name}: {_summary(r)}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from msae import checkpoint
    from msae.data import load_array, pick_device
    from msae.evaluate import evaluate, progressive_ks

    out = Path(a.out)
    if out.is_dir():
        raise MsaeError(f"--out {out}: is a directory; expected a JSON file path")
    sae = checkpoint.load(a.checkpoint, device=pick_device(a.device))
    data = load_array(a.data, expect_dim=sae.d)
    if a.k is None:
        ks = [None]
    elif a.k == "progressive":
        ks = [None] + progressive_ks(sae.n)
    else:
        ks = _int_list(a.k)
        for k in ks:
            if k < 1 or k > sae.n:
                raise MsaeError(f"--k: {k} is out of range; expected 1..{sae.n} (the number of latents)")
    truth = _load_truth(a.truth)
    res = evaluate(sae, data, ks, batch_size=a.batch_size, cknna_rows=a.cknna_rows)
    if truth is not None:
        res["recovery"] = _recovery(sae, truth)
    checkpoint.write_json(out, res)
    for key, r in res.items():
        print(f"recovery: {_recovery_line(r)}" if key == "recovery" else f"k={key}: {_summary(r)}")
    return 0


def _load_truth(path: str | None):
    from msae.synthetic import GroundTruth
    return None if path is None else GroundTruth.load(path)


def _recovery(sae, truth) -> dict:
    from msae.synthetic import recovery_score
    return recovery_score(sae.W_dec.detach().cpu().numpy(), truth)


def _recovery_line(r: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in r.items())


def cmd_extract(a: argparse.Namespace) -> int:
    from msae.extract import extract

    res = extract(a.model, a.pretrained, a.out, images=a.images, texts=a.texts, text_column=a.text_column,
                  batch_size=a.batch_size, workers=a.workers, device=a.device, dtype=a.dtype, split=a.split,
                  overwrite=a.overwrite, progress=not a.quiet)
    print(f"wrote {res['rows']} x {res['d']} {res['modality']} embeddings ({res['model']}, {res['pretrained']}) "
          f"to {res['out']}; skipped {res['skipped']}")
    return 0


def cmd_import_features(a: argparse.Namespace) -> int:
    from msae.importers import import_features

    info = import_features(a.file, a.out, column=a.column, model=a.model, pretrained=a.pretrained,
                           modality=a.modality, split=a.split, dtype=a.dtype, overwrite=a.overwrite)
    print(f"imported {info.n} x {info.d} embeddings from {a.file} to {a.out}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from msae.synthetic import write_synthetic

    files = write_synthetic(a.out, a.n, a.n_val, dtype=a.dtype, overwrite=a.overwrite, d=a.d, roots=a.roots,
                            branching=tuple(_int_list(a.branching)), active_roots=a.active_roots,
                            modality_gap=a.modality_gap, seed=a.seed)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from msae.cache import open_cache

    c = open_cache(a.cache, verify=a.verify)
    print(json.dumps(c.info.to_dict() | ({"verified": True} if a.verify else {}), indent=2))
    return 0


def cmd_import_reference(a: argparse.Namespace) -> int:
    from msae import checkpoint
    from msae.reference import import_reference

    out = Path(a.out_dir)
    _check_out_free(out, "OUT_DIR")
    sae, info = import_reference(a.file)
    pp = {"scaling": "reference-import", "mean_center": bool(sae.mean.abs().sum() > 0), "scale": float(sae.scale)}
    checkpoint.save(sae, out, preprocessing=pp, extra={"imported_from": info})
    print(f"imported {sae.cfg.method} SAE ({sae.d} -> {sae.n}) to {out}")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from msae.sweep.runner import Overrides, run_sweep

    resume = False if a.resume is None else (a.resume or True)  # --resume alone: the latest unfinished sweep
    summary = run_sweep(a.spec, resume=resume,
                        overrides=Overrides(address=a.address, storage=a.storage, tracking_uri=a.tracking_uri,
                                            cpus=a.cpus, gpu=a.gpu), quiet=a.quiet)
    return 0 if summary["done"] > 0 else 1


def cmd_pareto(a: argparse.Namespace) -> int:
    from msae.sweep.fronts import format_table, log_pareto
    from msae.sweep.runner import STATE_FILE, find_sweep
    from msae.sweep.spec import load_spec

    spec = load_spec(a.spec)
    uri = a.tracking_uri or spec.tracking.uri
    folder = find_sweep(Path(a.storage or spec.storage).resolve(), spec.name, a.sweep_id or "", include_finished=True)
    sweep_id = json.loads((folder / STATE_FILE).read_text())["sweep_id"]
    ref = {"l0": spec.pareto.reference_l0, "fvu": spec.pareto.reference_fvu,
           "one_minus_cosine": spec.pareto.reference_one_minus_cosine}
    fronts = log_pareto(uri, spec.experiment, sweep_id, ref)
    print(format_table(fronts))
    print(f"logged to parent run {fronts['parent_run_id']} of sweep {sweep_id} ({uri})")
    return 0


def cmd_ui(a: argparse.Namespace) -> int:
    import subprocess

    from msae.sweep.server import check_bind, server_command, server_env

    check_bind(a.host, a.port)
    print(f"MLflow UI for {a.tracking_uri} at http://{a.host}:{a.port} (Ctrl-C stops it)", file=sys.stderr)
    return subprocess.call(server_command(a.tracking_uri, a.host, a.port), env=server_env())


def cmd_tracking_server(a: argparse.Namespace) -> int:
    from msae.sweep.server import server_status, start_server, stop_server

    if a.action == "start":
        info = start_server(a.backend_uri, a.artifacts, a.host, a.port, a.state_dir, timeout=a.timeout)
        print(f"tracking server running: {info['url']} (pid {info['pid']}, store {info['backend_uri']}, "
              f"artifacts {info['artifacts']}); use --tracking-uri {info['url']}")
    elif a.action == "stop":
        print("stopped" if stop_server(a.state_dir) else f"no tracking server recorded in {a.state_dir}")
    else:
        st = server_status(a.state_dir)
        print(json.dumps(st))
        return 0 if st.get("healthy") else 1
    return 0


def _add_cache_options(p: argparse.ArgumentParser, split: bool = True) -> None:
    """Options of every command that writes feature caches."""
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype")
    if split:
        p.add_argument("--split", default="train", help="split name recorded in the cache (default train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msae", description="Sparse autoencoders (ReLU, TopK, BatchTopK, "
                                "Matryoshka) on CLIP embeddings.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one SAE on an embedding file")
    t.add_argument("--data", required=True, help="train embeddings (feature cache, .npy or reference _N_D.npy)")
    t.add_argument("--eval", action="append", help="evaluation embeddings (repeatable)")
    t.add_argument("--method", required=True, choices=["relu", "topk", "batchtopk", "msae"])
    t.add_argument("--expansion", type=float, default=8.0, help="n = expansion * d (default 8)")
    t.add_argument("--k", type=int, help="TopK/BatchTopK k (defaults 64 / 32)")
    t.add_argument("--levels", help="MSAE levels, comma-separated, ascending")
    t.add_argument("--levels-from", type=int, help="MSAE levels doubling from this value up to n, then n (default 64)")
    t.add_argument("--weighting", choices=["uw", "rw"], default="rw", help="MSAE level weighting (default rw)")
    t.add_argument("--alphas", help="explicit MSAE level weights, comma-separated")
    t.add_argument("--l1", type=float, help="ReLU L1 coefficient (default 0.003)")
    t.add_argument("--auxk", type=int, help="enable the AuxK dead-latent loss with this k_aux")
    t.add_argument("--lr", type=float, help="learning rate (per-method reference defaults)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--loss", choices=["nmse", "mse"], default="nmse")
    t.add_argument("--scaling", choices=["conventional", "reference", "none"], default="conventional")
    t.add_argument("--no-mean-center", action="store_true")
    t.add_argument("--device", default="auto")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint; JSON keyed by k")
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True)
    e.add_argument("--k", help="comma-separated k values, or 'progressive' (16, 32, ... n); default: own code")
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--cknna-rows", type=int, default=1024)
    e.add_argument("--device", default="auto")
    e.add_argument("--truth", help="ground-truth dictionary from `msae synth`: adds the recovery score")
    e.add_argument("--out", required=True, help="output JSON file")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("extract", help="embed images or texts with an open_clip model into a feature cache")
    x.add_argument("--model", required=True, help="open_clip model name, or a model-config .json file")
    x.add_argument("--pretrained", required=True, help="open_clip pretrained tag, or a local weights file")
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive), or tar shards (file, {000..009} range, glob)")
    src.add_argument("--texts", help=".txt (one text per line), .csv or .parquet file")
    x.add_argument("--text-column", help="column of a .csv/.parquet texts file (default: text)")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    x.add_argument("--device", default="auto", help="auto (CUDA with fp16 autocast when present), cpu, cuda:N")
    _add_cache_options(x)
    x.add_argument("--quiet", action="store_true")
    x.add_argument("--out", required=True, help="cache file to write (.arrow)")
    x.set_defaults(func=cmd_extract)

    im = sub.add_parser("import-features", help="convert .npy, reference _N_D.npy, Parquet or Arrow embeddings to a cache")
    im.add_argument("file")
    im.add_argument("--out", required=True, help="cache file to write (.arrow)")
    im.add_argument("--column", help="the list column holding embeddings (tables with several)")
    im.add_argument("--model", default="unknown", help="model name to record")
    im.add_argument("--pretrained", default="unknown", help="pretrained tag or weights hash to record")
    im.add_argument("--modality", choices=["image", "text"], default="image")
    _add_cache_options(im)
    im.set_defaults(func=cmd_import_features)

    sy = sub.add_parser("synth", help="CLIP-like synthetic caches with a known hierarchical dictionary")
    sy.add_argument("--out", required=True, help="folder to create")
    sy.add_argument("--n", type=int, default=20000, help="train rows per modality")
    sy.add_argument("--n-val", type=int, default=4000, help="validation rows per modality")
    sy.add_argument("--d", type=int, default=64)
    sy.add_argument("--roots", type=int, default=32, help="root features")
    sy.add_argument("--branching", default="3,2", help="children per feature at each deeper level")
    sy.add_argument("--active-roots", type=float, default=3.0, help="mean active root features per sample")
    sy.add_argument("--modality-gap", type=float, default=4.0)
    sy.add_argument("--seed", type=int, default=0)
    _add_cache_options(sy, split=False)
    sy.set_defaults(func=cmd_synth)

    ins = sub.add_parser("inspect", help="print a feature cache's metadata")
    ins.add_argument("cache")
    ins.add_argument("--verify", action="store_true", help="recompute the content hash")
    ins.set_defaults(func=cmd_inspect)

    r = sub.add_parser("import-reference", help="import a reference-code .pth checkpoint")
    r.add_argument("file")
    r.add_argument("out_dir")
    r.set_defaults(func=cmd_import_reference)

    sw = sub.add_parser("sweep", help="run a sweep spec with Ray Tune, tracked in MLflow (docs/sweeps.md)")
    sw.add_argument("spec", help="sweep spec YAML (e.g. sweeps/demo.yaml)")
    sw.add_argument("--resume", nargs="?", const="", default=None, metavar="SWEEP_ID",
                    help="continue the latest unfinished sweep of this spec (or the one named)")
    sw.add_argument("--address", help="join a running Ray cluster (auto, or HOST:PORT; default: RAY_ADDRESS, "
                    "else a private local Ray on 127.0.0.1)")
    sw.add_argument("--storage", help="folder (shared by all nodes on a cluster) for checkpoints and state")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the spec)")
    sw.add_argument("--cpus", type=float, help="CPUs per trial (overrides the spec)")
    sw.add_argument("--gpu", type=float, help="GPU (fraction) per trial (overrides the spec)")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    pa_ = sub.add_parser("pareto", help="recompute a sweep's Pareto fronts and log them to its parent run")
    pa_.add_argument("spec")
    pa_.add_argument("--sweep-id", help="default: the latest sweep of this spec")
    pa_.add_argument("--storage")
    pa_.add_argument("--tracking-uri")
    pa_.set_defaults(func=cmd_pareto)

    ui = sub.add_parser("ui", help="open the MLflow UI on a tracking store (bound to 127.0.0.1)")
    ui.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    ts = sub.add_parser("tracking-server", help="start, stop or check a shared MLflow tracking server (docs/cluster.md)")
    ts.add_argument("action", choices=["start", "stop", "status"])
    ts.add_argument("--backend-uri", default="sqlite:///mlflow/mlflow.db",
                    help="sqlite:///FILE or postgresql://USER:PASS@HOST/DB (default sqlite:///mlflow/mlflow.db)")
    ts.add_argument("--artifacts", default="mlflow/artifacts",
                    help="artifact store the server proxies (folder, s3://...; default mlflow/artifacts)")
    ts.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; reach it by SSH tunnel)")
    ts.add_argument("--port", type=int, default=5000)
    ts.add_argument("--state-dir", default="mlflow/run", help="PID and log files (default mlflow/run)")
    ts.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the health check")
    ts.set_defaults(func=cmd_tracking_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MsaeError as e:
        print(f"msae: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("msae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
