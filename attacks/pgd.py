"""Projected gradient descent (PGD), L-inf and L2, with restarts and per-sample early exit.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083). DLR loss: Croce & Hein,
"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020 (https://arxiv.org/abs/2003.01690).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks._compact import autocast, compact_every, expand_as_image, fmt_input, make_generator
from attacks._losses import LOSSES, ce_loss, dlr_loss, dlr_targeted_loss, margin_loss
from attacks.base import Attack, AttackResult
from robustkit.registry import ATTACKS
from robustkit.threat import ThreatModel, parse_eps


@dataclass
class _Best:
    """Per-sample running result over all restarts (global batch of ``B``)."""

    x: torch.Tensor        # (B, C, H, W) first successful iterate, else highest-loss iterate
    loss: torch.Tensor     # (B,) loss of ``x`` (while not successful)
    success: torch.Tensor  # (B,) bool
    queries: torch.Tensor  # (B,) int64 forward passes spent on the sample
    forward: int = 0       # sample-weighted forward passes
    backward: int = 0      # sample-weighted backward passes
    calls: int = 0         # batched model calls


@ATTACKS.register("pgd", help="PGD (Madry et al. 2018), L-inf / L2, restarts, CE / DLR / margin loss")
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on an ``eps``-ball in ``norm``.

    Each step ascends the loss with the threat model's steepest-ascent step (L-inf:
    ``sign(g)``; L2: ``g / ||g||_2``) and projects onto the ball and ``[0, 1]``
    (``ThreatModel.project``). Gradients are taken w.r.t. the input only.

    Args (defaults):
        norm: ``"linf"`` or ``"l2"`` ("linf").
        eps: ball radius; a number or a string such as ``"8/255"`` (required).
        steps: gradient steps per restart (10).
        step_size: step length; ``None`` -> ``2.5 * eps / steps`` (Madry et al. 2018).
        restarts: random restarts; each later restart runs, batched, only on the samples
            still standing (1).
        random_start: start uniformly inside the ball (True, as in Madry et al.).
        loss: ``"ce"``, ``"dlr"`` (Croce & Hein 2020; needs >= 3 classes, targeted >= 4)
            or ``"margin"`` (C&W-style) ("ce").
        targeted: ``y`` holds target labels; the loss is descended towards them (False).
            Targeted DLR needs the source class: the clean prediction (one extra forward).
        early_stop: samples that succeeded leave the active batch (index compaction), so
            per-step work tracks the samples still standing (True).
        amp: autocast (bf16, fp16 where bf16 is missing) on CUDA; ignored on CPU (False).
        channels_last: feed inputs in channels_last memory format; convert the model with
            ``model.to(memory_format=torch.channels_last)`` yourself (False).
        seed: seed for the random starts on ``x.device``; ``None`` uses the global RNG.

    Result: ``x_adv (B, C, H, W)`` -- per sample the *first* successful iterate (in both
    early-stop modes, so they agree), else the highest-loss iterate -- always inside the
    ball and ``[0, 1]``. Success is read from the forward pass that also computes the
    gradient (iterate ``t``'s logits tell whether iterate ``t`` succeeds), plus one final
    forward for the last iterate: a restart costs ``steps + 1`` forwards and ``steps``
    backwards per sample that stays active. ``queries (B,)`` counts forward passes per
    sample; ``info["forward_passes"]`` / ``info["backward_passes"]`` are sample-weighted
    totals (sum over samples of passes), ``info["model_calls"]`` counts batched calls.
    """

    name = "pgd"

    def __init__(self, *, norm: str = "linf", eps: float | str, steps: int = 10, step_size: float | None = None,
                 restarts: int = 1, random_start: bool = True, loss: str = "ce", targeted: bool = False,
                 early_stop: bool = True, amp: bool = False, channels_last: bool = False,
                 seed: int | None = None) -> None:
        self.norm = ThreatModel(norm, 0.0).norm          # validates the norm name
        self.eps = parse_eps(eps)
        self.steps = _int_at_least("steps", steps, 0)
        self.restarts = _int_at_least("restarts", restarts, 1)
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
                raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
            step_size = float(step_size)
        self.step_size = step_size
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
        self.loss = loss
        self.random_start, self.targeted, self.early_stop = bool(random_start), bool(targeted), bool(early_stop)
        self.amp, self.channels_last = bool(amp), bool(channels_last)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed

    # -- the attack -------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        self._check_classes(model, x)
        tm = ThreatModel(self.norm, self.eps)
        step = self.step_size if self.step_size is not None else float(tm.default_step_size(self.steps))
        gen = make_generator(x.device, self.seed)
        b = x.shape[0]
        best = _Best(x.clone(), torch.full((b,), float("-inf"), device=x.device),
                     torch.zeros(b, dtype=torch.bool, device=x.device), torch.zeros(b, dtype=torch.long,
                                                                                    device=x.device))
        src = self._source_labels(model, x, best) if self.targeted and self.loss == "dlr" else None
        for r in range(self.restarts):
            act = torch.arange(b, device=x.device) if r == 0 else (~best.success).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            self._restart(model, x, y, src, act, tm, step, gen, best)
        x_adv = tm.project(best.x, x)  # a no-op up to rounding: the guarantee, in one place
        info = {"forward_passes": best.forward, "backward_passes": best.backward, "model_calls": best.calls,
                "count_unit": "sample-weighted passes (sum over samples)"}
        return AttackResult(x_adv, best.success, best.queries, info)

    def _restart(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None,
                 act: torch.Tensor, tm: ThreatModel, step: float, gen: torch.Generator | None, best: _Best) -> None:
        """One restart on the samples ``act`` (global indices), compacting as they succeed."""
        x0, ya = x[act], y[act]                                   # (b, C, H, W), (b,)
        sa = src[act] if src is not None else None
        xa = tm.random_start(x0, gen) if self.random_start else x0.clone()
        every = compact_every(x.device)
        for t in range(self.steps + 1):
            last = t == self.steps
            xa = xa.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last), autocast(x.device, self.amp):
                logits = model(fmt_input(xa, self.channels_last))  # (b, K)
            loss = self._loss(logits, ya, sa)                      # (b,)
            succ = (logits.argmax(1) == ya) if self.targeted else (logits.argmax(1) != ya)
            _record(best, act, xa.detach(), loss.detach(), succ)
            if last:
                break
            (grad,) = torch.autograd.grad(loss.sum(), xa)          # input gradient only
            best.backward += xa.shape[0]
            xa = tm.project(tm.step(xa.detach(), grad, step), x0)
            if self.early_stop and (t + 1) % every == 0:
                keep = (~best.success[act]).nonzero().squeeze(1)    # the one host sync per step
                if keep.numel() == 0:
                    return
                if keep.numel() < act.numel():
                    act, x0, ya, xa = act[keep], x0[keep], ya[keep], xa[keep]
                    sa = sa[keep] if sa is not None else None

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss to *ascend*: ``(b,)``."""
        if not self.targeted:
            return {"ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}[self.loss](logits, y)
        if self.loss == "ce":
            return -ce_loss(logits, y)
        if self.loss == "margin":
            return -margin_loss(logits, y)                          # z_t - max_{j != t} z_j
        return dlr_targeted_loss(logits, src, y)

    def _source_labels(self, model: nn.Module, x: torch.Tensor, best: _Best) -> torch.Tensor:
        """Clean predictions, the ``y`` of targeted DLR (one counted forward)."""
        with torch.no_grad(), autocast(x.device, self.amp):
            pred = model(fmt_input(x, self.channels_last)).argmax(1)
        best.queries += 1
        best.forward += x.shape[0]
        best.calls += 1
        return pred

    def _check_classes(self, model: nn.Module, x: torch.Tensor) -> None:
        if self.loss != "dlr":
            return
        k = getattr(getattr(model, "module", model), "num_classes", None)
        need = 4 if self.targeted else 3
        if isinstance(k, int) and k < need:
            raise ValueError(f"loss='dlr' needs at least {need} classes (Croce & Hein 2020), the model has {k}; "
                             "use loss='ce' or 'margin'")


def _record(best: _Best, act: torch.Tensor, xa: torch.Tensor, loss: torch.Tensor, succ: torch.Tensor) -> None:
    """Fold iterate ``xa`` of the samples ``act`` into ``best`` without a host sync."""
    if act.numel() == best.success.numel():                        # whole batch active: no gather/scatter
        done = best.success
        better = ~done & ~succ & (loss > best.loss)
        best.x = torch.where(expand_as_image((succ & ~done) | better, xa), xa, best.x)
        best.loss = torch.where(better, loss, best.loss)
        best.success = done | succ
        best.queries += 1
    else:
        done = best.success[act]                                   # (b,)
        better = ~done & ~succ & (loss > best.loss[act])
        upd = (succ & ~done) | better
        best.x[act] = torch.where(expand_as_image(upd, xa), xa, best.x[act])
        best.loss[act] = torch.where(better, loss, best.loss[act])
        best.success[act] = done | succ
        best.queries[act] += 1
    best.forward += xa.shape[0]
    best.calls += 1


def _int_at_least(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)
