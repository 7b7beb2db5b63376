"""Training the denoiser of denoised smoothing, the classifier frozen.

Salman, Sun, Yang, Kapoor & Kolter 2020, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers" (NeurIPS; code ``microsoft/denoised-smoothing``): a denoiser ``D`` in front of an
off-the-shelf classifier ``F`` makes ``F(D(.))`` a good base classifier for randomized smoothing.
The model trained here is a ``denoised`` composite (``robustkit.composite.denoised_model``); only
``D`` learns, ``F`` runs in eval mode with its weights detached (no gradient, no weight decay, no
batch-norm statistics update). Then ``--method smoothing`` certifies the composite as it is.

- ``denoiser-mse``: ``E_delta ||D(x + delta) - x||^2`` (mean over pixels), ``delta ~ N(0, sigma^2 I)``.
- ``denoiser-stab``: ``E_delta CE(F(D(x + delta)), t)`` with ``t = F(x)``'s prediction (their *stability*
  objective, ``target="prediction"``) or the label (their *classification* objective, ``target="label"``).
  Salman et al. train with sigma in {0.12, 0.25, 0.5, 1.0}; their best results fine-tune an
  MSE-trained denoiser with Stab ("Stab+MSE"), Adam, lr 1e-3 (see ``configs/train_denoiser_*``).
- ``denoiser-stab`` with ``zo_queries=q``: the zeroth-order variant of Zhang et al. 2022, "How to
  Robustify Black-Box ML Models? A Zeroth-Order Optimization Perspective" (ICLR; code
  ``damon-demon/Black-Box-Defense``), F a black box: the gradient of the loss w.r.t. the denoised
  image ``z = D(x + delta)`` is the randomized gradient estimate (RGE)
  ``g = d / (q mu) * sum_i [l(z + mu u_i) - l(z)] u_i``, ``u_i`` uniform on the unit sphere, ``q`` queries,
  smoothing ``mu``; the loss backpropagated into D is ``mean_b <z_b, g_b>`` (its gradient w.r.t. z is g).
  Their defaults: ``q = 192``, ``mu = 0.005``, target = F's prediction. This is their ZO-DS; ZO-AE-DS
  additionally inserts an autoencoder so that the estimate lives in a low-dimensional latent -- not built here.

All objectives run in one process (``InputError`` under DDP: the denoiser's forward is not DDP's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from defenses.base import Defense, replicated
from robustkit.composite import DenoisedNet, parts
from robustkit.errors import InputError
from robustkit.modes import eval_mode
from robustkit.registry import DEFENSES
from robustkit.validate import integer, one_of, positive
from robustkit.zoo import unwrap


def _net(model: nn.Module, name: str) -> DenoisedNet:
    if replicated(model):
        raise InputError(f"{name} trains in one process (not under torchrun/DDP): run robustkit train without torchrun")
    net = parts(model, DenoisedNet)
    if net is None:
        raise InputError(f"{name} trains the denoiser of a 'denoised' model (robustkit.composite.denoised_model("
                         f"classifier), or --arch denoised); got {getattr(model, 'arch', type(model).__name__)!r}")
    return net


def frozen(classifier: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``classifier(z)`` in eval mode with detached weights: gradients reach ``z``, never the classifier."""
    state = {k: v.detach() for k, v in classifier.named_parameters()}
    state.update(dict(classifier.named_buffers()))
    with eval_mode(classifier):
        return functional_call(classifier, state, (z,))


class _DenoiserObjective(Defense):
    name = "denoiser"

    def check_model(self, model: nn.Module) -> None:
        """``InputError`` unless ``model`` is a ``denoised`` composite (the train pipeline asks before any work)."""
        _net(model, self.name)


@DEFENSES.register("denoiser-mse", help="denoised smoothing: denoiser MSE on Gaussian noise (Salman et al. 2020)")
class DenoiserMSE(_DenoiserObjective):
    """``||D(x + sigma * eps) - x||^2`` averaged over pixels; the classifier is not used. Default ``sigma=0.25``."""

    name = "denoiser-mse"

    def __init__(self, *, sigma: float = 0.25) -> None:
        self.sigma = positive("sigma", sigma)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        net = _net(model, self.name)
        x_noisy = x + self.sigma * torch.randn_like(x)                     # (B, C, H, W), not clipped
        out = net.denoiser(net_input(model, x_noisy))                      # (B, C, H, W)
        loss = F.mse_loss(out, net_input(model, x))
        return loss, {"loss": loss.detach(), "mse": loss.detach()}


@DEFENSES.register("denoiser-stab", help="denoised smoothing: stability / classification loss through the "
                                         "frozen classifier (Salman et al. 2020); zo_queries: zeroth-order (Zhang "
                                         "et al. 2022)")
class DenoiserStab(_DenoiserObjective):
    """``CE(F(D(x + sigma * eps)), t)``, ``t`` = ``F(x)``'s prediction (``target="prediction"``, Stab) or ``y``
    (``target="label"``, Clf). ``zo_queries=q`` replaces F's gradient by the RGE estimate (``zo_mu``).
    Defaults: ``sigma=0.25``, ``target="prediction"``, first order; ZO: ``q=192``, ``mu=0.005`` in the paper."""

    name = "denoiser-stab"

    def __init__(self, *, sigma: float = 0.25, target: str = "prediction", zo_queries: int | None = None,
                 zo_mu: float = 0.005, zo_batch: int = 4096) -> None:
        self.sigma = positive("sigma", sigma)
        self.target = one_of("target", target, ("prediction", "label"))
        self.zo_queries = None if zo_queries is None else integer("zo_queries", zo_queries, 1)
        self.zo_mu = positive("zo_mu", zo_mu)
        self.zo_batch = integer("zo_batch", zo_batch, 1)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        net = _net(model, self.name)
        clf = net.classifier
        with torch.no_grad():
            t = frozen(clf, net_input(model, x)).argmax(1) if self.target == "prediction" else y      # (B,)
        z = net.denoiser(net_input(model, x + self.sigma * torch.randn_like(x)))                    # (B, C, H, W)
        if self.zo_queries is None:
            logits = frozen(clf, z)                                                                 # (B, K)
            loss = F.cross_entropy(logits, t)
            return loss, {"loss": loss.detach(), "agree": (logits.argmax(1) == t).float().mean().detach()}
        grad, loss0, agree = self._rge(clf, z.detach(), t)                                          # (B, C, H, W)
        surrogate = (z * grad).flatten(1).sum(1).mean()    # d/dz = grad / B: the mean loss's estimated gradient
        queries = x.shape[0] * (self.zo_queries + 1 + (self.target == "prediction"))              # F calls
        return surrogate, {"loss": loss0, "agree": agree, "queries": float(queries)}

    @torch.no_grad()
    def _rge(self, clf: nn.Module, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RGE of ``grad_z CE(F(z_b), t_b)`` per sample ``(B, C, H, W)``, plus the mean loss and agreement at ``z``."""
        B, q, mu = z.shape[0], int(self.zo_queries or 0), self.zo_mu
        d = z[0].numel()
        logits0 = frozen(clf, z)                                                                    # (B, K)
        loss0 = F.cross_entropy(logits0, t, reduction="none")                                       # (B,)
        u = torch.randn(B, q, d, device=z.device, dtype=z.dtype)
        u = u / u.norm(dim=2, keepdim=True)                                                         # (B, q, d) unit
        zq = (z.flatten(1)[:, None, :] + mu * u).reshape(B * q, *z.shape[1:])                        # (B*q, C, H, W)
        tq = t.repeat_interleave(q)                                                                 # (B*q,)
        lq = torch.cat([F.cross_entropy(frozen(clf, zq[i:i + self.zo_batch]), tq[i:i + self.zo_batch],
                                        reduction="none") for i in range(0, B * q, self.zo_batch)])  # (B*q,)
        diff = (lq.view(B, q) - loss0[:, None]) / mu                                                # (B, q)
        grad = (d / q) * (diff[:, :, None] * u).sum(1)                                              # (B, d)
        return grad.view_as(z), loss0.mean(), (logits0.argmax(1) == t).float().mean()


def net_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the composite's net sees: its own normalization (the identity for built-in composites) of ``x``."""
    return unwrap(model).normalize(x)
