"""Sanity checks before trusting a robustness number (in the spirit of AutoAttack's ``checks.py``).

Croce & Hein 2020 and Carlini et al. 2019 ("On Evaluating Adversarial Robustness") list
the usual ways an evaluation silently overestimates robustness; these checks flag four:

- the model is in train mode (BatchNorm / Dropout behave differently than at test time);
- the outputs look like probabilities, not logits (softmax inside the model flattens the
  gradients of CE / margin losses);
- the input gradient is exactly zero for many samples (gradient masking / obfuscation);
- the model is randomized (two forwards of the same input differ): use EOT-style attacks.

Each check returns a list of warning strings; ``sanity_checks`` runs them all, emits each
message once through ``warnings.warn`` (category ``SanityWarning``) and returns the list.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.modes import eval_mode


class SanityWarning(UserWarning):
    """A robustness evaluation may be unreliable (see the message)."""


def check_train_mode(model: nn.Module) -> list[str]:
    """Warn when ``model`` (or any submodule) is in train mode."""
    if any(m.training for m in model.modules()):
        return ["model is in train mode; attacks run it in eval mode, but make sure that is what you evaluate "
                "(BatchNorm/Dropout change behaviour)"]
    return []


@torch.no_grad()
def check_probabilities(model: nn.Module, x: torch.Tensor, atol: float = 1e-3) -> list[str]:
    """Warn when every output row is in ``[0, 1]`` and sums to 1: the model returns
    probabilities, and attack losses expect logits."""
    with eval_mode(model):
        out = model(x).float()                                        # (B, K)
    if out.numel() and bool(((out >= 0) & (out <= 1)).all()) and bool(((out.sum(1) - 1).abs() < atol).all()):
        return ["model outputs look like probabilities (rows in [0, 1] summing to 1), not logits; remove the "
                "final softmax -- losses on probabilities give vanishing gradients and overestimate robustness"]
    return []


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, frac: float = 0.1) -> list[str]:
    """Warn when the cross-entropy input gradient is exactly zero for more than ``frac`` of the samples."""
    with eval_mode(model):
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)                            # (B, C, H, W)
    zero = (g.flatten(1).abs().amax(1) == 0).float().mean().item()
    if zero > frac:
        return [f"input gradient is exactly zero for {zero:.0%} of the samples: possible gradient masking; "
                "gradient-based attacks may overestimate robustness (try a black-box attack)"]
    return []


@torch.no_grad()
def check_randomized(model: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> list[str]:
    """Warn when two forward passes (eval mode) on the same input differ."""
    with eval_mode(model):
        a, b = model(x).float(), model(x).float()
    if not torch.allclose(a, b, atol=atol, rtol=1e-4):
        return ["model is randomized (two forward passes on the same input differ); use an attack with "
                "expectation over transformation (EOT), single-sample gradients overestimate robustness"]
    return []


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_samples: int = 64,
                  warn: bool = True) -> list[str]:
    """Run every check on (up to ``max_samples`` of) ``x (B, C, H, W)`` in ``[0, 1]``, ``y (B,)``.

    The model's mode is restored afterwards. Returns the warning strings (empty: all fine);
    with ``warn=True`` each is also emitted as a ``SanityWarning``.
    """
    x, y = x[:max_samples], y[:max_samples].to(x.device)
    msgs = check_train_mode(model) + check_probabilities(model, x) + check_zero_gradients(model, x, y) \
        + check_randomized(model, x)
    if warn:
        for m in msgs:
            warnings.warn(m, SanityWarning, stacklevel=2)
    return msgs
