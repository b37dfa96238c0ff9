"""The ``msae`` command line: it parses arguments and calls the library's builders, nothing more.

Every command exits 0 on success and 2 on bad input (one line: ``msae: error: ...``); ``--debug``
shows the full cause of an error instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from msae.errors import MsaeError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help (except where there is none), descriptions kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {s!r}") from None


def summary_line(r: dict) -> str:
    """One line of the headline metrics of an evaluation entry."""
    return (f"fvu={r['fvu']:.4f} fvu_dataset={r['fvu_dataset']:.4f} cosine={r['cosine']:.4f} "
            f"l0={r['l0']:.1f} zero_fraction={r['zero_fraction']:.4f} dead={r['dead_fraction']:.3f}")


def _check_out_file(path: Path, overwrite: bool) -> Path:
    if path.is_dir():
        raise MsaeError(f"--out {path}: is a directory; expected a file path")
    if path.exists() and not overwrite:
        raise MsaeError(f"--out {path}: exists; choose another path or pass --overwrite")
    return path


# ---------------------------------------------------------------- train / evaluate

def _method_values(args: argparse.Namespace, method: str) -> dict:
    """The hyperparameters given on the command line, checked against ``method``'s schema."""
    from msae.sae import REGISTRY, method_of

    own = {h.name for h in method_of(method).hypers}
    values = {}
    for name in sorted({h.name for m in REGISTRY.values() for h in m.hypers}):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in own:
            flags = ", ".join(h.flag for h in method_of(method).hypers) or "none"
            raise MsaeError(f"--{name.replace('_', '-')}: not a setting of method {method} (its settings: {flags})")
        values[name] = value
    return values


def _eval_sets(paths: list[str] | None, d: int) -> dict:
    from msae.data import load_array

    evals: dict = {}
    for p in paths or []:
        name = Path(p).stem
        if name in evals:
            raise MsaeError(f"--eval {p}: another evaluation file is also named {name!r}; rename one of them")
        evals[name] = load_array(p, expect_dim=d)
    return evals


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from msae import atomic, checkpoint
    from msae.config import TrainConfig
    from msae.data import fingerprint, load_array
    from msae.evaluate import evaluate
    from msae.sae import create_sae, method_of, sae_config
    from msae.train import DivergedError, fit, preprocessing_record

    out = atomic.check_output_folder(args.out, "--out", args.overwrite)
    method = method_of(args.method)
    values = _method_values(args, args.method)
    train = load_array(args.data, min_rows=2)
    d = train.shape[1]
    n = int(round(args.expansion * d))
    if not (args.expansion > 0 and n >= 1):
        raise MsaeError(f"--expansion: expected a positive factor, got {args.expansion}")
    evals = _eval_sets(args.eval, d)
    cfg = sae_config(args.method, d, n, auxk=args.auxk, **values)
    tcfg = TrainConfig(lr=args.lr if args.lr is not None else method.default_lr, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, loss=args.loss, scaling=args.scaling, mean_center=not args.no_mean_center, device=args.device)
    sae = create_sae(cfg, tcfg.seed)
    log: list[dict] = []

    def on_epoch(rec, trainer):
        log.append(rec.flat())
        if rec.eval and not args.quiet:  # the last epoch is reported by the final lines below
            summary = "; ".join(f"{name}: {summary_line(r)}" for name, r in rec.eval.items())
            tqdm.write(f"epoch {rec.epoch}: loss={rec.loss:.4f} {summary}", file=sys.stderr)

    try:  # the last epoch is evaluated once, in full, as the final model
        fit(sae, train, tcfg, evals, on_epoch=on_epoch, progress=not args.quiet, eval_last=False)
    except DivergedError as e:
        raise MsaeError(f"training diverged: {e}") from None
    final = {name: evaluate(sae, arr, batch_size=tcfg.batch_size)["own"] for name, arr in evals.items()}
    log[-1].update({f"{name}/{k}": v for name, r in final.items() for k, v in r.items()})
    data_info = {"train": str(args.data), "rows": int(train.shape[0]), "fingerprint": fingerprint(train)}
    checkpoint.save(sae, out, train=tcfg.to_dict(), preprocessing=preprocessing_record(sae, tcfg), data=data_info,
                    files={"metrics.json": {"history": log, "final": final}}, overwrite=args.overwrite)
    print(f"saved {cfg.method} SAE ({d} -> {n}) to {out}", file=sys.stderr)
    for name, r in final.items():
        print(f"{name}: {summary_line(r)}")
    return 0


def _ks(spec: str | None, n: int) -> list:
    from msae.evaluate import progressive_ks

    if spec is None:
        return [None]
    if spec == "progressive":
        return [None] + progressive_ks(n)
    try:
        ks = _int_list(spec)
    except argparse.ArgumentTypeError as e:
        raise MsaeError(f"--k: {e}") from None
    for k in ks:
        if k < 1 or k > n:
            raise MsaeError(f"--k: {k} is out of range; expected 1..{n} (the number of latents)")
    return ks


def cmd_evaluate(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.data import load_array, pick_device
    from msae.evaluate import evaluate
    from msae.synthetic import GroundTruth, recovery_score

    out = _check_out_file(Path(args.out), args.overwrite)
    sae = checkpoint.load(args.checkpoint, device=pick_device(args.device))
    data = load_array(args.data, expect_dim=sae.d)
    ks = _ks(args.k, sae.n)
    truth = None if args.truth is None else GroundTruth.load(args.truth)
    res = evaluate(sae, data, ks, batch_size=args.batch_size, cknna_rows=args.cknna_rows)
    if truth is not None:
        res["recovery"] = recovery_score(sae.W_dec.detach().cpu().numpy(), truth)
    atomic.write_json(out, res)
    for key, r in res.items():
        if key == "recovery":
            print("recovery: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
        else:
            print(f"k={key}: {summary_line(r)}")
    return 0


# ---------------------------------------------------------------- interpretation (docs/interpret.md)

def _vocab(path: str, d: int):
    """A vocabulary text cache of dimension ``d``, and its words (texts, else ids)."""
    from msae.cache import open_input_cache

    vocab = open_input_cache(path, "--vocab")
    if vocab.info.d != d:
        raise MsaeError(f"--vocab {path}: embeddings of dimension {vocab.info.d}; the model has d = {d}")
    return vocab, vocab.texts or vocab.ids


def cmd_probe(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.data import pick_device
    from msae.cache import open_input_cache
    from msae.interpret.probe import Probe, probe_fidelity, split_holdout, train_probe

    out = _check_out_file(Path(args.out), args.overwrite)
    sae = checkpoint.load(args.checkpoint, device=pick_device(args.device))
    ks = _ks(args.k, sae.n)
    data = open_input_cache(args.data, "--data", sae.d, labelled=True)
    x, labels = data.embeddings, data.labels
    report: dict = {}
    if args.probe:
        probe = Probe.load(args.probe)
        report["probe"] = {"file": str(args.probe)}
    else:
        probe, report["probe"] = train_probe(x, labels, seed=args.seed, holdout=args.holdout)
    if args.eval:
        ev = open_input_cache(args.eval, "--eval", sae.d, labelled=True)
        ex, elabels = ev.embeddings, ev.labels
    else:
        _, held = split_holdout(x.shape[0], args.holdout, args.seed)
        ex, elabels = x[held], [labels[i] for i in held]
    res = probe_fidelity(sae, probe, ex, elabels, ks)
    if not args.probe:
        probe_file = out.with_name(out.stem + ".probe.safetensors")
        probe.save(probe_file)
        report["probe"]["file"] = str(probe_file)
    atomic.write_json(out, {**res, **report})
    for key, r in res.items():
        print(f"k={key}: kl={r['kl']:.4f} agreement={r['agreement']:.3f} "
              f"accuracy original={r['accuracy_original']:.3f} reconstructed={r['accuracy_reconstructed']:.3f}")
    return 0


def cmd_name(args: argparse.Namespace) -> int:
    import csv
    import io

    from msae import atomic, checkpoint
    from msae.data import load_array
    from msae.interpret.naming import name_latents

    out = _check_out_file(Path(args.out), args.overwrite)
    sae = checkpoint.load(args.checkpoint)
    vocab, words = _vocab(args.vocab, sae.d)
    data = None if args.data is None else load_array(args.data, expect_dim=sae.d)
    nm = name_latents(sae, vocab.embeddings, words, top=args.top, mapping=args.mapping, threshold=args.threshold,
                      data=data)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["latent", "name", "score", "named"] + (["frequency"] if nm.frequency is not None else [])
               + ["top"])
    for j, (names, scores) in enumerate(zip(nm.names, nm.scores)):
        w.writerow([j, names[0], f"{scores[0]:.4f}", int(nm.named[j])]
                   + ([f"{nm.frequency[j]:.6f}"] if nm.frequency is not None else [])
                   + [";".join(f"{a}:{b:.3f}" for a, b in zip(names, scores))])
    atomic.write_text(out, buf.getvalue())
    print(f"named {int(nm.named.sum())} of {sae.n} latents (best score > {nm.threshold:.3f}, {args.mapping} mapping); "
          f"wrote {out}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.interpret.align import align, directions

    out = _check_out_file(Path(args.out), args.overwrite)
    a, b = checkpoint.load(args.checkpoint_a), checkpoint.load(args.checkpoint_b)
    if a.d != b.d:
        raise MsaeError(f"align: {args.checkpoint_a} has d = {a.d}, {args.checkpoint_b} has d = {b.d}")
    res = align(directions(a, args.by), directions(b, args.by))
    res.pop("pairs")
    atomic.write_json(out, {**res, "by": args.by})
    print(f"mean matched cosine ({args.by}): {res['mean_cosine']:.4f} over {res['matched']} pairs; "
          f"{res['fraction_above_0.9']:.1%} above 0.9")
    return 0


def _latent_for_word(sae, vocab_path: str | None, word: str, option: str) -> int:
    """The latent whose best vocabulary name is ``word`` (the highest-scoring such latent)."""
    from msae.interpret.naming import name_latents

    if vocab_path is None:
        raise MsaeError(f"{option} {word}: needs --vocab TEXT_CACHE to find the latent named {word!r}")
    vocab, words = _vocab(vocab_path, sae.d)
    if word not in words:
        raise MsaeError(f"{option} {word}: not in the vocabulary {vocab_path} ({len(words)} entries)")
    nm = name_latents(sae, vocab.embeddings, words, top=1)
    hits = [j for j, names in enumerate(nm.names) if names[0] == word]
    if not hits:
        raise MsaeError(f"{option} {word}: no latent has {word!r} as its best name (see msae name)")
    return max(hits, key=lambda j: nm.scores[j, 0])


def cmd_search(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.cache import open_input_cache
    from msae.interpret.search import check_latent, steer, top_rows

    out = None if args.out is None else _check_out_file(Path(args.out), args.overwrite)
    sae = checkpoint.load(args.checkpoint)
    data = open_input_cache(args.data, "--data", sae.d)
    ids, texts = data.ids, data.texts
    if args.query is None:
        if (args.latent is None) == (args.concept is None):
            raise MsaeError("search: give exactly one of --latent J and --concept WORD (or --query ID with --add)")
        latent = check_latent(sae, args.latent) if args.latent is not None else \
            _latent_for_word(sae, args.vocab, args.concept, "--concept")
        hits, score = top_rows(sae, data.embeddings, latent, args.top), "activation"
    else:
        if (args.latent is None) == (args.add is None):
            raise MsaeError("search --query: give exactly one of --add WORD and --latent J (the steering direction)")
        row = {v: i for i, v in enumerate(ids)}.get(args.query)
        if row is None:
            raise MsaeError(f"--query {args.query}: no row of {args.data} has this id")
        latent = check_latent(sae, args.latent) if args.latent is not None else \
            _latent_for_word(sae, args.vocab, args.add, "--add")
        hits, score = steer(sae, data.embeddings, row, latent, args.scale, args.top), "cosine"
    lines = [atomic.dumps({"rank": r, "row": i, "id": ids[i], **({"text": texts[i]} if texts else {}),
                           score: round(v, 6), "latent": latent}, indent=None) for r, (i, v) in enumerate(hits, 1)]
    if out is None:
        print("\n".join(lines))
    else:
        atomic.write_text(out, "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} rows (latent {latent}) to {out}")
    return 0


def cmd_bias(args: argparse.Namespace) -> int:
    import csv
    import io

    import numpy as np

    from msae import atomic, checkpoint
    from msae.cache import open_input_cache
    from msae.interpret.bias import attribute_bias
    from msae.interpret.naming import name_latents

    out = _check_out_file(Path(args.out), args.overwrite)
    sae = checkpoint.load(args.checkpoint)
    data = open_input_cache(args.data, "--data", sae.d)
    attrs = data.attributes
    if args.attribute not in attrs:
        raise MsaeError(f"--attribute {args.attribute}: not an attribute column of {args.data} "
                        f"(it has: {', '.join(attrs) or 'none'})")
    names = None
    if args.vocab:
        vocab, words = _vocab(args.vocab, sae.d)
        names = [n[0] for n in name_latents(sae, vocab.embeddings, words, top=1).names]
    b = attribute_bias(sae, data.embeddings, attrs[args.attribute], replicates=args.bootstrap, seed=args.seed)
    order = np.argsort(-b.effect, kind="stable")
    picks = [(j, "more") for j in order[:args.top]] + [(j, "less") for j in order[::-1][:args.top]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["direction", "rank", "latent", "effect", "ci_low", "ci_high", "rate_with", "rate_without",
                "mean_with", "mean_without"] + (["name"] if names else []))
    for rank, (j, direction) in enumerate(picks):
        w.writerow([direction, rank % args.top + 1, int(j), f"{b.effect[j]:.4f}", f"{b.ci[0, j]:.4f}",
                    f"{b.ci[1, j]:.4f}", f"{b.rate[1, j]:.4f}", f"{b.rate[0, j]:.4f}", f"{b.mean[1, j]:.4f}",
                    f"{b.mean[0, j]:.4f}"] + ([names[j]] if names else []))
    atomic.write_text(out, buf.getvalue())
    top = ", ".join(f"{j} ({b.effect[j]:+.2f}{', ' + names[j] if names else ''})" for j, _ in picks[:3])
    print(f"{args.attribute}: {b.counts[1]} rows with, {b.counts[0]} without; most raised latents: {top}; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.cache import open_input_cache
    from msae.data import pick_device
    from msae.interpret.naming import name_latents
    from msae.interpret.report import MARKER, Samples, latent_stats, make_thumbnails, write_report

    out = Path(args.out)
    atomic.check_output_folder(out, "--out", args.overwrite, "an earlier msae report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise MsaeError(f"--out {out}: holds files but no {MARKER}; --overwrite replaces only an earlier msae report")
    if args.per_page < 1 or args.samples < 1:
        raise MsaeError("report: --per-page and --samples must be at least 1")
    sae = checkpoint.load(args.checkpoint, device=pick_device(args.device))
    data = open_input_cache(args.data, "--data", sae.d)
    images = None
    if args.images:
        images = Path(args.images)
        if not images.is_dir():
            raise MsaeError(f"--images {images}: no such folder")
    names = scores = named = None
    if args.vocab:
        vocab, words = _vocab(args.vocab, sae.d)
        nm = name_latents(sae, vocab.embeddings, words, top=args.words)
        names, scores, named = nm.names, nm.scores, nm.named
    x = data.embeddings
    if args.rows and args.rows < x.shape[0]:
        import numpy as np
        rows = np.sort(np.random.default_rng(0).choice(x.shape[0], args.rows, replace=False))
        x, ids = x[rows], [data.ids[i] for i in rows]
        texts = None if data.texts is None else [data.texts[i] for i in rows]
        labels = None if data.labels is None else [data.labels[i] for i in rows]
    else:
        ids, texts, labels = data.ids, data.texts, data.labels
    st = latent_stats(sae, x, samples=args.samples)
    title = args.title or f"{Path(args.checkpoint).name} on {Path(args.data).name}"
    with atomic.replaced_dir(out) as tmp:  # an earlier report is replaced whole; a failure leaves it as it was
        thumbs, failed = make_thumbnails(st.top_rows.ravel(), ids, images, tmp / "thumbs") if images else ({}, 0)
        summary = write_report(sae, st, tmp, Samples(ids, texts, thumbs, labels), names, scores, named, title, args.per_page)
    note = f"; {failed} images could not be read (shown by id)" if failed else ""
    print(f"report of {sae.n} latents on {st.rows} rows ({summary['pages']} pages, {summary['dead_latents']} never fire"
          + (f", {summary['named_latents']} named" if named is not None else "") + f"{note}): {out / 'index.html'}")
    return 0


# ---------------------------------------------------------------- data

def cmd_extract(args: argparse.Namespace) -> int:
    from msae.extract import extract

    res = extract(args.model, args.pretrained, args.out, images=args.images, texts=args.texts, text_column=args.text_column,
                  batch_size=args.batch_size, workers=args.workers, device=args.device, dtype=args.dtype, split=args.split,
                  overwrite=args.overwrite, progress=not args.quiet, labels=args.labels, attributes=args.attributes)
    print(f"wrote {res['rows']} x {res['d']} {res['modality']} embeddings ({res['model']}, {res['pretrained']}) "
          f"to {res['out']}; skipped {res['skipped']}")
    return 0


def cmd_import_features(args: argparse.Namespace) -> int:
    from msae.importers import import_features

    info = import_features(args.file, args.out, column=args.column, model=args.model, pretrained=args.pretrained,
                           modality=args.modality, split=args.split, dtype=args.dtype, overwrite=args.overwrite,
                           id_column=args.id_column, text_column=args.text_column, label_column=args.label_column,
                           attribute_columns=args.attribute_columns or [])
    print(f"imported {info.n} x {info.d} embeddings from {args.file} to {args.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from msae.synthetic import write_synthetic

    files = write_synthetic(args.out, args.n, args.n_val, dtype=args.dtype, overwrite=args.overwrite, d=args.d, roots=args.roots,
                            branching=tuple(args.branching), active_roots=args.active_roots,
                            modality_gap=args.modality_gap, seed=args.seed)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from msae import atomic
    from msae.cache import open_cache

    c = open_cache(args.cache, verify=args.verify)
    print(atomic.dumps(c.info.to_dict() | ({"verified": True} if args.verify else {})))
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from msae import atomic, checkpoint
    from msae.reference import import_reference

    out = atomic.check_output_folder(args.out_dir, "OUT_DIR", args.overwrite)
    sae, info = import_reference(args.file)
    pp = {"scaling": "reference-import", "mean_center": bool(sae.mean.abs().sum() > 0), "scale": float(sae.scale)}
    checkpoint.save(sae, out, preprocessing=pp, extra={"imported_from": info}, overwrite=args.overwrite)
    print(f"imported {sae.cfg.method} SAE ({sae.d} -> {sae.n}) to {out}")
    return 0


# ---------------------------------------------------------------- sweeps

def cmd_sweep(args: argparse.Namespace) -> int:
    from msae.sweep.runner import Overrides, dry_run, run_sweep

    overrides = Overrides(address=args.address, storage=args.storage, tracking_uri=args.tracking_uri, cpus=args.cpus, gpu=args.gpu)
    if args.dry_run:
        print(dry_run(args.spec, overrides))
        return 0
    resume = False if args.resume is None else (args.resume or True)  # --resume alone: the latest unfinished sweep
    return run_sweep(args.spec, resume=resume, overrides=overrides, quiet=args.quiet).exit_code


def cmd_sweeps(args: argparse.Namespace) -> int:
    from msae.sweep.runner import format_sweeps

    print(format_sweeps(args.storage))
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from msae.sweep.runner import Overrides, relog

    print(relog(args.spec, args.sweep_id, Overrides(storage=args.storage, tracking_uri=args.tracking_uri)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from msae.sweep.server import check_bind, serve_ui
    from msae.sweep.tracking import sweep_links

    check_bind(args.host, args.port)
    return serve_ui(args.tracking_uri, args.host, args.port, sweep_links(args.tracking_uri, f"http://{args.host}:{args.port}"))


def cmd_tracking_server(args: argparse.Namespace) -> int:
    from msae import atomic
    from msae.sweep.server import server_status, start_server, stop_server

    if args.action == "start":
        info = start_server(args.backend_uri, args.artifacts, args.host, args.port, args.state_dir, timeout=args.timeout)
        print(f"tracking server running: {info['url']} (pid {info['pid']}, store {info['backend_uri']}, "
              f"artifacts {info['artifacts']}); use --tracking-uri {info['url']}")
    elif args.action == "stop":
        print("stopped" if stop_server(args.state_dir) else f"no tracking server recorded in {args.state_dir}")
    else:
        st = server_status(args.state_dir)
        print(atomic.dumps(st, indent=None))
        return 0 if st.get("healthy") else 1
    return 0


# ---------------------------------------------------------------- parser

def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One option per hyperparameter of the registered methods (msae/sae/<method>.py), shared by
    methods that use the same name."""
    from msae.sae import REGISTRY

    g = p.add_argument_group("method settings (each applies to the methods named in its help)")
    seen: dict[str, tuple] = {}
    for m in REGISTRY.values():
        for h in m.hypers:
            seen.setdefault(h.name, (h, []))[1].append(m)
    parse = {"float": float, "int": int, "choice": str, "int_list": _int_list, "float_list": _float_list}
    for name, (h, methods) in seen.items():
        defaults = []
        for m in methods:
            field = m.config.__dataclass_fields__.get(name)
            if field is not None and field.default not in (None, (), [], field.default_factory):
                defaults.append(f"{m.name} {field.default}")
        where = ", ".join(m.name for m in methods)
        text = f"[{where}] {h.help}" + (f" (default: {'; '.join(defaults)})" if defaults else "")
        kw = {"choices": list(h.choices)} if h.kind == "choice" else {}
        g.add_argument(h.flag, dest=name, type=parse[h.kind], default=None, help=text, **kw)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """The training recipe's options, with TrainConfig's defaults (declared once, msae/config.py)."""
    from msae.config import LOSSES, SCALINGS, TrainConfig
    from msae.sae import REGISTRY

    t = TrainConfig()
    g = p.add_argument_group("training recipe (docs/method.md)")
    lrs = ", ".join(f"{m.name} {m.default_lr:g}" for m in REGISTRY.values())
    g.add_argument("--lr", type=float, help=f"learning rate (default: the method's reference default: {lrs})")
    g.add_argument("--epochs", type=int, default=t.epochs, help="passes over the train data")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="samples per step")
    g.add_argument("--seed", type=int, default=t.seed, help="seed of the initialisation and the data order")
    g.add_argument("--loss", choices=LOSSES, default=t.loss, help="reconstruction loss")
    g.add_argument("--scaling", choices=SCALINGS, default=t.scaling,
                   help="input scale: conventional E||x'||^2 = d, the reference code's quirk, or none")
    g.add_argument("--no-mean-center", action="store_true", help="do not subtract the train mean")
    g.add_argument("--device", default=t.device, help="auto (CUDA when present), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from msae.version import __version__

    from msae.sae import METHODS
    p = argparse.ArgumentParser(prog="msae", formatter_class=_Formatter, description=(
        f"Sparse autoencoders ({', '.join(METHODS)}) on CLIP embeddings:\n"
        "extract features, train and evaluate SAEs, run sweeps on Ray Tune tracked in MLflow.\n"
        "Docs: docs/usage.md, docs/sweeps.md."))
    p.add_argument("--version", action="version", version=f"msae {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full cause of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)
        c.set_defaults(func=func)
        return c

    from msae.sae import REGISTRY
    t = command("train", "train one SAE on an embedding file", cmd_train,
                "Train one SAE with the paper's recipe; writes a checkpoint folder and its metrics.json.\n\nMethods:\n"
                + "\n".join(f"  {m.name:<10} {m.summary}" for m in REGISTRY.values()))
    t.add_argument("--data", required=True, help="train embeddings (feature cache, .npy or reference _N_D.npy)")
    t.add_argument("--eval", nargs="+", action="extend", metavar="FILE",
                   help="evaluation embeddings, evaluated after every epoch (several files, or repeat the option)")
    t.add_argument("--method", required=True, choices=METHODS, help="SAE method")
    t.add_argument("--expansion", type=float, default=8.0, help="n = expansion * d latents")
    t.add_argument("--auxk", type=int, help="enable the AuxK dead-latent loss with this k_aux (any method)")
    _add_method_options(t)
    _add_train_options(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.add_argument("--out", required=True, help="checkpoint folder to write (new or empty)")
    t.add_argument("--overwrite", action="store_true", help="write into an existing folder, replacing only msae's files")

    e = command("evaluate", "evaluate a checkpoint; JSON keyed by k", cmd_evaluate,
                "Evaluate a checkpoint on an embedding file: FVU, cosine, L0, dead latents, CKNNA, ... (docs/method.md)\n"
                "for the model's own code and for top-k restrictions of ReLU(pre).")
    e.add_argument("checkpoint", help="checkpoint folder (msae train, a sweep's results/KEY.sae, msae import-reference)")
    e.add_argument("--data", required=True, help="embeddings (feature cache, .npy or reference _N_D.npy)")
    e.add_argument("--k", help="comma-separated k values, or 'progressive' (16, 32, ..., n); default: the own code")
    e.add_argument("--batch-size", type=int, default=4096, help="rows per evaluation batch")
    e.add_argument("--cknna-rows", type=int, default=1024, help="rows used for CKNNA (it depends on this number)")
    e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    e.add_argument("--truth", help="ground-truth dictionary from `msae synth`: adds the recovery score")
    e.add_argument("--out", required=True, help="output JSON file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    pr = command("probe", "linear-probe fidelity of a checkpoint's reconstructions (docs/interpret.md)", cmd_probe,
                 "Train a linear probe on the original embeddings of a labelled cache (or load one with --probe) and\n"
                 "measure how its predictions change on the reconstructions: KL, agreement, accuracies; JSON keyed by k.")
    pr.add_argument("checkpoint", help="checkpoint folder")
    pr.add_argument("--data", required=True, help="labelled feature cache the probe is trained on")
    pr.add_argument("--eval", help="labelled cache to measure on (default: the held-out part of --data)")
    pr.add_argument("--probe", help="a probe saved by an earlier msae probe (.probe.safetensors): no training")
    pr.add_argument("--k", help="comma-separated k values, or 'progressive'; default: the own code")
    pr.add_argument("--holdout", type=float, default=0.1, help="fraction of --data held out for early stopping")
    pr.add_argument("--seed", type=int, default=0, help="seed of the split and the probe's initialisation")
    pr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    pr.add_argument("--out", required=True, help="output JSON file (the probe is saved beside it)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    nm = command("name", "name every latent from a vocabulary of text embeddings (docs/interpret.md)", cmd_name)
    nm.add_argument("checkpoint", help="checkpoint folder")
    nm.add_argument("--vocab", required=True, help="text feature cache of the vocabulary (msae extract --texts)")
    nm.add_argument("--top", type=int, default=5, help="names kept per latent")
    nm.add_argument("--mapping", choices=["centred", "reference"], default="centred",
                    help="centred: decoder direction vs mean-centred vocabulary; reference: W_dec/s + mean vs raw")
    nm.add_argument("--threshold", type=float, help="score above which a latent is named (default: calibrated so "
                    "that random directions are named about 1%% of the time)")
    nm.add_argument("--data", help="embeddings on which to measure each latent's firing frequency")
    nm.add_argument("--out", required=True, help="output CSV file")
    nm.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    al = command("align", "seed alignment of two checkpoints: mean matched cosine (Hungarian)", cmd_align)
    al.add_argument("checkpoint_a", help="checkpoint folder")
    al.add_argument("checkpoint_b", help="checkpoint folder")
    al.add_argument("--by", choices=["decoder", "encoder"], default="decoder", help="which directions to match")
    al.add_argument("--out", required=True, help="output JSON file")
    al.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    se = command("search", "rows that activate a latent or concept most, or concept steering of a query",
                 cmd_search, "Concept-based similarity search (JSON lines, strongest first):\n"
                 "  --latent J | --concept WORD --vocab V      the rows that activate the latent most\n"
                 "  --query ID (--add WORD --vocab V | --latent J) [--scale S]\n"
                 "      the rows nearest (cosine) to the query's embedding steered along the latent")
    se.add_argument("checkpoint", help="checkpoint folder")
    se.add_argument("--data", required=True, help="feature cache to search (its ids and texts are printed)")
    se.add_argument("--latent", type=int, help="latent index")
    se.add_argument("--concept", help="a vocabulary word: the latent whose best name it is")
    se.add_argument("--vocab", help="text feature cache of the vocabulary (for --concept and --add)")
    se.add_argument("--query", help="id of the row to steer")
    se.add_argument("--add", help="a vocabulary word: steer the query along the latent it names")
    se.add_argument("--scale", type=float, default=1.0, help="steering strength, in units of the latent's largest "
                    "activation on --data")
    se.add_argument("--top", type=int, default=10, help="rows to return")
    se.add_argument("--out", help="write the JSON lines to this file instead of the terminal")
    se.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    bi = command("bias", "latents that fire more or less on rows with an attribute (docs/interpret.md)", cmd_bias)
    bi.add_argument("checkpoint", help="checkpoint folder")
    bi.add_argument("--data", required=True, help="feature cache with attribute columns")
    bi.add_argument("--attribute", required=True, help="the attribute column")
    bi.add_argument("--top", type=int, default=10, help="latents listed per direction")
    bi.add_argument("--vocab", help="text feature cache of a vocabulary: adds each latent's best name")
    bi.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates of the confidence interval")
    bi.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    bi.add_argument("--out", required=True, help="output CSV file")
    bi.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    rp = command("report", "latent cards: a static, offline HTML report of a checkpoint (docs/interpret.md)",
                 cmd_report, "Index of latents by firing frequency (with names from --vocab), one card per latent\n"
                 "(top-activating rows, activation histogram, top words), and the decoder-orthogonality and\n"
                 "activation-statistics figures; paginated. Open OUT/index.html.")
    rp.add_argument("checkpoint", help="checkpoint folder")
    rp.add_argument("--data", required=True, help="feature cache whose rows are shown (ids, texts)")
    rp.add_argument("--images", help="image root: ROOT/ID is each row's image (thumbnails in the report)")
    rp.add_argument("--vocab", help="text feature cache of a vocabulary: names and top words")
    rp.add_argument("--samples", type=int, default=8, help="top-activating rows per latent")
    rp.add_argument("--words", type=int, default=5, help="top vocabulary words per latent")
    rp.add_argument("--per-page", type=int, default=200, help="latents per index page (and card page)")
    rp.add_argument("--rows", type=int, help="use a seeded random subset of this many rows (default: all)")
    rp.add_argument("--title", help="report title (default: checkpoint and cache names)")
    rp.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    rp.add_argument("--out", required=True, help="output folder (new, empty, or an earlier report with --overwrite)")
    rp.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")

    x = command("extract", "embed images or texts with an open_clip model into a feature cache", cmd_extract)
    x.add_argument("--model", required=True, help="open_clip model name, or a model-config .json file")
    x.add_argument("--pretrained", required=True, help="open_clip pretrained tag, or a local weights file")
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive), or tar shards (file, {000..009} range, glob)")
    src.add_argument("--texts", help=".txt (one text per line), .csv or .parquet file")
    x.add_argument("--text-column", help="column of a .csv/.parquet texts file (default: text)")
    x.add_argument("--labels", help="CSV with columns id,label: the rows' labels (default for an image folder: "
                   "each image's class folder, the first folder level under it)")
    x.add_argument("--attributes", help="CSV with an id column and one 0/1 (or -1/1) column per attribute")
    x.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass")
    x.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    x.add_argument("--device", default="auto", help="auto (CUDA with fp16 autocast when present), cpu, cuda:N")
    _add_cache_options(x)
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--out", required=True, help="cache file to write (.arrow)")

    im = command("import-features", "convert .npy, reference _N_D.npy, Parquet or Arrow embeddings to a cache",
                 cmd_import_features)
    im.add_argument("file", help="the embeddings to import")
    im.add_argument("--out", required=True, help="cache file to write (.arrow)")
    im.add_argument("--column", help="the list column holding embeddings (tables with several)")
    im.add_argument("--id-column", help="column of row ids (default: 'id' when present, else row numbers)")
    im.add_argument("--text-column", help="column of texts (default: 'text' when present)")
    im.add_argument("--label-column", help="column of class labels (stored as the cache's label column)")
    im.add_argument("--attribute-columns", type=lambda v: [a for a in v.split(",") if a],
                    help="comma-separated 0/1 (or -1/1) columns stored as attributes")
    im.add_argument("--model", default="unknown", help="model name to record")
    im.add_argument("--pretrained", default="unknown", help="pretrained tag or weights hash to record")
    im.add_argument("--modality", choices=["image", "text"], default="image", help="modality to record")
    _add_cache_options(im)

    sy = command("synth", "CLIP-like synthetic caches with a known hierarchical dictionary", cmd_synth)
    sy.add_argument("--out", required=True, help="folder to create")
    sy.add_argument("--n", type=int, default=20000, help="train rows per modality")
    sy.add_argument("--n-val", type=int, default=4000, help="validation rows per modality")
    sy.add_argument("--d", type=int, default=64, help="embedding dimension")
    sy.add_argument("--roots", type=int, default=32, help="root features")
    sy.add_argument("--branching", type=_int_list, default=[3, 2], help="children per feature at each deeper level")
    sy.add_argument("--active-roots", type=float, default=3.0, help="mean active root features per sample")
    sy.add_argument("--modality-gap", type=float, default=4.0, help="distance between the two modalities' offsets")
    sy.add_argument("--seed", type=int, default=0, help="seed of the dictionary and the samples")
    _add_cache_options(sy, split=False)

    ins = command("inspect", "print a feature cache's metadata", cmd_inspect)
    ins.add_argument("cache", help="cache file (.arrow)")
    ins.add_argument("--verify", action="store_true", help="recompute the content hash (reads the whole file)")

    r = command("import-reference", "import a reference-code .pth checkpoint", cmd_import_reference)
    r.add_argument("file", help="reference checkpoint ({n}_{d}_{activation}..._{train}.pth)")
    r.add_argument("out_dir", help="checkpoint folder to write (new or empty)")
    r.add_argument("--overwrite", action="store_true", help="write into an existing folder, replacing only msae's files")

    sw = command("sweep", "run a sweep spec with Ray Tune, tracked in MLflow (docs/sweeps.md)", cmd_sweep)
    sw.add_argument("spec", help="sweep spec YAML (e.g. sweeps/demo.yaml)")
    sw.add_argument("--resume", nargs="?", const="", default=None, metavar="SWEEP_ID",
                    help="continue the latest unfinished sweep of this spec (or the one named)")
    sw.add_argument("--dry-run", action="store_true", help="validate the spec and print its trials; run nothing")
    sw.add_argument("--address", help="join a running Ray cluster (auto, or HOST:PORT; default: RAY_ADDRESS, "
                    "else a private local Ray on 127.0.0.1)")
    sw.add_argument("--storage", help="folder (shared by all nodes on a cluster) for sweep state and results")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the spec)")
    sw.add_argument("--cpus", type=float, help="CPUs per trial (overrides the spec)")
    sw.add_argument("--gpu", type=float, help="GPU (fraction) per trial (overrides the spec)")
    sw.add_argument("--quiet", action="store_true", help="only the final table")

    ls = command("sweeps", "list the sweeps in a storage folder and their state", cmd_sweeps)
    ls.add_argument("--storage", default="msae-sweeps", help="the sweeps' storage folder (a spec's `storage`)")

    pa = command("pareto", "recompute a sweep's Pareto fronts and log them (and anything not yet logged) to MLflow",
                 cmd_pareto)
    pa.add_argument("spec", help="the sweep's spec YAML")
    pa.add_argument("--sweep-id", help="default: the latest sweep of this spec")
    pa.add_argument("--storage", help="the sweep's storage folder (default: the spec's)")
    pa.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")

    ui = command("ui", "open the MLflow dashboard on a tracking store (bound to 127.0.0.1)", cmd_ui)
    ui.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the tracking store to show")
    ui.add_argument("--host", default="127.0.0.1", help="bind address")
    ui.add_argument("--port", type=int, default=5000, help="port")

    ts = command("tracking-server", "start, stop or check a shared MLflow tracking server (docs/cluster.md)",
                 cmd_tracking_server)
    ts.add_argument("action", choices=["start", "stop", "status"], help="what to do")
    ts.add_argument("--backend-uri", default="sqlite:///mlflow/mlflow.db",
                    help="sqlite:///FILE or postgresql://USER:PASS@HOST/DB")
    ts.add_argument("--artifacts", default="mlflow/artifacts",
                    help="artifact store the server proxies (folder, s3://...)")
    ts.add_argument("--host", default="127.0.0.1", help="bind address (reach it by SSH tunnel)")
    ts.add_argument("--port", type=int, default=5000, help="port")
    ts.add_argument("--state-dir", default="mlflow/run", help="PID and log files")
    ts.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the health check")
    return p


def _add_cache_options(p: argparse.ArgumentParser, split: bool = True) -> None:
    """Options of every command that writes feature caches."""
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype")
    if split:
        p.add_argument("--split", default="train", help="split name recorded in the cache")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MsaeError as e:
        if args.debug:
            raise
        print(f"msae: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("msae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
