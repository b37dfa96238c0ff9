"""One full training step of msae and of its peers at the paper shape, measured in one process.

Contenders (each library's own step with its own default optimizer; hyperparameters below):

  msae                 Trainer.step: forward, NMSE, backward, decoder renormalisation, gradient
                       projection, clip 1.0, fused AdamW (topk k=64, batchtopk k=64, msae levels
                       64, 128, ..., 4096, 6144 with RW weights, from a fresh model and from one
                       whose b_enc is shifted so that 80% of latents are zero, the sparsity the
                       paper reports for trained MSAEs: the MSAE's cost grows with the positive
                       pre-activations it decodes, which early training raises above half)
  sae-lens             SAETrainer.step: training_forward_pass (MSE, AuxK), firing statistics,
                       backward, clip 1.0, Adam, LR scheduler (topk, batchtopk k=64,
                       matryoshka_batchtopk k=64 with widths 384, 768, 1536, 3072, 6144)
  sparsify (EleutherAI) the body of sparsify.Trainer's step without its LLM hooks: decoder
                       renormalisation, SparseCoder forward (fused TopK encoder, FVU; on CPU its eager
                       embedding_bag decoder), backward,
                       gradient projection, signum (ScheduleFree SignSGD, its default optimizer)
  overcomplete         train_sae over a one-batch loader (monitoring=0 when timed; 1, its
                       default, on the steps whose loss is checked): forward, top_k_auxiliary_loss,
                       backward, clip 1.0, Adam (lr 5e-4, as in its README)
  dictionary-learning  Trainer.update: loss (MSE + AuxK, threshold update), backward, gradient
                       projection, clip 1.0, Adam, scheduler, decoder renormalisation (TopK,
                       BatchTopK, MatryoshkaBatchTopK with group fractions 1/16, 1/16, 1/8, 1/4, 1/2)

The prefix-dictionary Matryoshka of sae-lens and dictionary-learning (each level a prefix of the
dictionary, BatchTopK codes) is a different, cheaper objective than the paper's MSAE (each level
a top-k of the same code over the whole dictionary); it is the one users compare with.

Every contender runs 20 steps on one fixed batch; the training loss its own step reports (each
library's own loss: NMSE, MSE + AuxK, FVU, ...) at step 1 and step 20 is printed and must fall
(a step that trains nothing is not measured). Steps are timed in interleaved rounds (one step of
each contender per round, so machine noise hits all alike) beside one dense [B, d] @ [d, n]
matmul, the encoder's floor.

overcomplete's package imports cv2 (its models and plots) and dictionary-learning's imports
nnsight (its activation buffer) at top level: both are loaded as bare packages (a module object
with only __path__, so that `import overcomplete.sae` runs overcomplete/sae/__init__.py but not
overcomplete/__init__.py). Only the SAE and trainer modules are imported.

Install the peers with `pip install -e '.[bench]'` (never needed by the tests or CI).
Usage: python bench/peers.py [--rounds 5] [--only msae,sae-lens,...] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

D, N, B, K = 768, 6144, 4096, 64
CHECK_STEPS = 20
Step = Callable[..., float]  # step(batch, report=False): one training step; the library's own loss


@dataclass
class Contender:
    library: str
    method: str
    make: Callable[[torch.Tensor], Step]


def bare_package(name: str) -> None:
    """Register package ``name`` without running its __init__.py, so its submodules import alone."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name}: not installed (pip install -e '.[bench]')")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module


# ------------------------------------------------------------------ contenders
def msae_step(method: str, zero_fraction: float = 0.0, **hyper):
    def make(x):
        from msae.config import TrainConfig
        from msae.sae import create_sae, method_of, sae_config
        from msae.train import Trainer
        sae = create_sae(sae_config(method, D, N, **hyper), 0)
        if zero_fraction:  # shift b_enc so that this fraction of pre-activations is <= 0
            with torch.no_grad():
                pre = sae.pre_activation(x[:256] * D ** 0.5)
                sae.b_enc.sub_(torch.quantile(pre.flatten(), zero_fraction))
        trainer = Trainer(sae, TrainConfig(lr=method_of(method).default_lr, batch_size=B), torch.device("cpu"))
        # msae trains on preprocessed rows, E||x'||^2 = d (docs/method.md; done once per data set,
        # outside the step): the step gets the batch in that scale
        return lambda batch, report=False: float(trainer.step(batch * D ** 0.5).loss)
    return make


def saelens_step(arch: str):
    def make(x):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
        if arch == "topk":
            from sae_lens.saes.topk_sae import TopKTrainingSAE as Sae, TopKTrainingSAEConfig as Cfg
            cfg = Cfg(d_in=D, d_sae=N, k=K)
        elif arch == "batchtopk":
            from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as Sae, BatchTopKTrainingSAEConfig as Cfg
            cfg = Cfg(d_in=D, d_sae=N, k=K)
        else:
            from sae_lens.saes.matryoshka_batchtopk_sae import (
                MatryoshkaBatchTopKTrainingSAE as Sae, MatryoshkaBatchTopKTrainingSAEConfig as Cfg)
            cfg = Cfg(d_in=D, d_sae=N, k=K, matryoshka_widths=[N // 16, N // 8, N // 4, N // 2, N])
        sae = Sae(cfg)
        trainer = SAETrainer(SAETrainerConfig(total_training_samples=B * 10_000, train_batch_size_samples=B,
                                                              lr_end=3e-5),
                             sae, data_provider=iter(()))

        def step(batch, report=False):
            out = trainer.step(batch)
            trainer.n_training_steps += 1  # as SAETrainer.fit does after each step
            return float(out.loss)
        return step
    return make


def sparsify_step(x):
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU; on CPU it uses embedding_bag
    from schedulefree import ScheduleFreeWrapper
    from sparsify.config import SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from sparsify.sparse_coder import SparseCoder
    sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K), device="cpu")
    sae.b_dec.data = x.mean(0)  # sparsify.Trainer's first step
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (N / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()

    def step(batch, report=False):
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        loss = out.fvu + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        return float(loss)
    return step


def overcomplete_step(arch: str):
    def make(x):
        bare_package("overcomplete")
        from overcomplete.sae import BatchTopKSAE, TopKSAE, train_sae
        from overcomplete.sae.losses import top_k_auxiliary_loss
        model = (TopKSAE if arch == "topk" else BatchTopKSAE)(D, nb_concepts=N, top_k=K, device="cpu")
        opt = torch.optim.Adam(model.parameters(), lr=5e-4)

        def step(batch, report=False):  # timed steps without monitoring; the checked ones with it
            with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch summary line
                logs = train_sae(model, [batch], top_k_auxiliary_loss, opt, nb_epochs=1, monitoring=int(report))
            return logs["step_loss"][-1] if report else float("nan")
        return step
    return make


def dictionary_learning_step(arch: str):
    def make(x):
        bare_package("dictionary_learning")
        common = dict(steps=10_000, activation_dim=D, dict_size=N, k=K, layer=0, lm_name="bench",
                      warmup_steps=1, threshold_start_step=0, device="cpu", seed=0)
        if arch == "topk":
            from dictionary_learning.trainers.top_k import TopKTrainer
            trainer = TopKTrainer(**common)
        elif arch == "batchtopk":
            from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
            trainer = BatchTopKTrainer(**common)
        else:
            from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
            trainer = MatryoshkaBatchTopKTrainer(group_fractions=[1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2], **common)
        trainer.update(0, x)  # step 0 sets b_dec to the geometric median: not a steady-state step
        counter = iter(range(1, 1 << 30))
        return lambda batch, report=False: float(trainer.update(next(counter), batch))
    return make


CONTENDERS = [
    Contender("msae", "topk", msae_step("topk", k=K)),
    Contender("msae", "batchtopk", msae_step("batchtopk", k=K)),
    Contender("msae", "msae, fresh", msae_step("msae", levels_from=64, weighting="rw")),
    Contender("msae", "msae, 80% zero", msae_step("msae", 0.8, levels_from=64, weighting="rw")),
    Contender("sae-lens", "topk", saelens_step("topk")),
    Contender("sae-lens", "batchtopk", saelens_step("batchtopk")),
    Contender("sae-lens", "matryoshka_batchtopk", saelens_step("matryoshka")),
    Contender("sparsify", "topk", sparsify_step),
    Contender("overcomplete", "topk", overcomplete_step("topk")),
    Contender("overcomplete", "batchtopk", overcomplete_step("batchtopk")),
    Contender("dictionary-learning", "topk", dictionary_learning_step("topk")),
    Contender("dictionary-learning", "batchtopk", dictionary_learning_step("batchtopk")),
    Contender("dictionary-learning", "matryoshka_batchtopk", dictionary_learning_step("matryoshka")),
]
DISTRIBUTIONS = {"msae": "msae", "sae-lens": "sae-lens", "sparsify": "eai-sparsify",
                 "overcomplete": "overcomplete", "dictionary-learning": "dictionary-learning"}


def clip_like_batch(seed: int = 0) -> torch.Tensor:
    """A [B, D] batch with sparse structure: 32 of 12,288 unit atoms per row, exponential weights,
    plus 10% noise, mean-centred and scaled to unit mean squared norm."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(2 * N, D, generator=g), dim=1)
    idx = torch.randint(0, 2 * N, (B, 32), generator=g)
    w = torch.empty(B, 32).exponential_(generator=g)
    x = (w[..., None] * atoms[idx]).sum(1)
    x = x + 0.1 * x.std() * torch.randn(B, D, generator=g)
    x = x - x.mean(0)
    return x / x.pow(2).sum(1).mean().sqrt()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, choices=range(1, CHECK_STEPS - 1), metavar="1..18",
                    help="interleaved timing rounds (default 5)")
    ap.add_argument("--only", default="", help="comma-separated libraries to run (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    chosen = [c for c in CONTENDERS if not only or c.library in only]
    x = clip_like_batch()
    W = torch.randn(D, N)
    versions = {}
    for lib in dict.fromkeys(c.library for c in chosen):
        try:
            versions[lib] = importlib.metadata.version(DISTRIBUTIONS[lib])
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"peers: {DISTRIBUTIONS[lib]} is not installed (pip install -e '.[bench]')")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, d {D}, n {N}, batch {B}, "
          f"k {K}; " + ", ".join(f"{lib} {v}" for lib, v in versions.items()), flush=True)

    runs = []
    for c in chosen:
        torch.manual_seed(0)
        step = c.make(x)
        first = step(x, report=True)  # also the warm-up (allocations, lazy inits, the native build)
        runs.append([c, step, first, []])
    floor = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        x @ W
        floor.append(time.perf_counter() - t0)
        for run in runs:
            t0 = time.perf_counter()
            run[1](x)
            run[3].append(time.perf_counter() - t0)
    gemm = statistics.median(floor)
    print(f"{'library':<20} {'method':<21} {'step s':>7} {'x GEMM':>7} {'samples/s':>10} "
          f"{'loss step 1':>11} {'step 20':>9}")
    print(f"{'(floor)':<20} {'[B,d]@[d,n] matmul':<21} {gemm:7.3f} {1.0:6.2f}x {B / gemm:10.0f}")
    failed = []
    for c, step, first, times in runs:
        for _ in range(CHECK_STEPS - 2 - a.rounds):
            step(x)
        last = step(x, report=True)
        sec = statistics.median(times)
        ok = last < first
        if not ok:
            failed.append(f"{c.library} {c.method}")
        print(f"{c.library:<20} {c.method:<21} {sec:7.3f} {sec / gemm:6.2f}x {B / sec:10.0f} "
              f"{first:11.4g} {last:9.4g}{'' if ok else '  LOSS DID NOT FALL'}", flush=True)
    if failed:
        sys.exit(f"peers: the loss did not fall over {CHECK_STEPS} steps for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
