"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): z_j = ReLU(pre_j) * H(pre_j - theta_j)
with a learned per-latent threshold theta, trained with an L0 penalty. theta is a plain parameter
(not exp(log theta) as in SAELens): with Adam, a log-parametrised threshold moves by a factor of
about e^lr per step, far too slowly for the few thousand steps of a CLIP SAE's training.

Neither the step function nor the L0 count has a useful gradient with respect to theta, so both
use the paper's straight-through estimator with a rectangle kernel K(u) = 1{|u| < 1/2} of width
``bandwidth`` (eps):
    d JumpReLU(pre) / d theta = -(theta / eps) K((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) K((pre - theta) / eps)
while d JumpReLU(pre) / d pre = H(pre - theta) as usual and the L0 term sends nothing to pre.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from msae.config import SAEConfig, check_number
from msae.sae.base import SAE, StepOutput
from msae.sae.method import Hyper, Method


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    method: ClassVar[str] = "jumprelu"
    l0_coef: float = 1e-3  # lambda: loss = recon + l0_coef * mean_b(L0(z_b))
    bandwidth: float = 0.001  # eps of the straight-through kernel (processed space)
    threshold_init: float = 0.001  # initial theta of every latent (processed space)

    def validate(self) -> None:
        super().validate()
        check_number("l0_coef", self.l0_coef, 0.0)
        check_number("bandwidth", self.bandwidth, 0.0, low_open=True)
        check_number("threshold_init", self.threshold_init, 0.0, low_open=True)


def _jump(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.where((pre > theta) & (pre > 0), pre, torch.zeros_like(pre))


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):  # noqa: D401
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return _jump(pre, theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        grad_theta = (-(theta / ctx.eps) * _kernel(pre, theta, ctx.eps) * g).sum(0)
        return g * ((pre > theta) & (pre > 0)), grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):  # noqa: D401
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _kernel(pre, theta, ctx.eps) * g).sum(0), None


class JumpReLUSAE(SAE):
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.threshold = nn.Parameter(torch.full((cfg.n,), float(cfg.threshold_init)))

    @torch.no_grad()
    def rescale_latents(self, norms: torch.Tensor) -> None:
        super().rescale_latents(norms)
        self.threshold.mul_(norms)  # the threshold scales with its pre-activation

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return _jump(pre, self.threshold)

    def training_step(self, xp, recon_loss, dead=None) -> StepOutput:
        pre = self.pre_activation(xp)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        recon = self.decode_processed(z)
        rec = recon_loss(recon, xp)
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum(1).mean()
        nz = z.detach() != 0
        out = StepOutput(rec + self.cfg.l0_coef * l0, recon, nz.sum(0), float(l0.detach()),
                         {"recon": rec.detach(), "l0_penalty": l0.detach()})
        return self.with_auxk(out, xp, pre.detach(), dead)


def dense_loss(sae: JumpReLUSAE, xp: torch.Tensor, recon_loss) -> torch.Tensor:
    """The same estimator written with detach tricks instead of custom autograd functions: the
    forward values are ReLU(pre) * H and H, and (theta - sg(theta)) * c adds exactly c to theta's gradient."""
    eps, theta = sae.cfg.bandwidth, sae.threshold
    pre = (xp - sae.b_dec) @ sae.W_enc + sae.b_enc
    window = ((pre.detach() - theta.detach()).abs() < eps / 2).float()
    step = (pre.detach() > theta.detach()).float()
    shift = theta - theta.detach()
    z = torch.relu(pre) * step + shift * (-(theta.detach() / eps) * window)
    l0 = (step + shift * (-(1.0 / eps) * window)).sum(1).mean()
    return recon_loss(z @ sae.W_dec + sae.b_dec, xp) + sae.cfg.l0_coef * l0


METHOD = Method(
    name="jumprelu", summary="JumpReLU SAE: a learned per-latent threshold, trained with an L0 penalty",
    config=JumpReLUConfig, sae=JumpReLUSAE, dense_loss=dense_loss,
    hypers=(Hyper("l0_coef", "float", "L0 penalty coefficient lambda", low=0.0, key="l0c"),
            Hyper("bandwidth", "float", "straight-through kernel width", low=0.0, low_open=True, key="bw"),
            Hyper("threshold_init", "float", "initial threshold", low=0.0, low_open=True, sweep=False)),
    default_lr=5e-4, progressive=False,
    examples={"jumprelu": {"l0_coef": 1e-3, "bandwidth": 0.05, "threshold_init": 0.05}})
