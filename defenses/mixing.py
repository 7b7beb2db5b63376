"""Adaptive smoothing's mixing-network objective (Bai et al. 2024): train alpha(x), base models frozen.

Bai, Anderson, Kim, Sojoudi, "Improving the Accuracy-Robustness Trade-Off of Classifiers via Adaptive
Smoothing", SIAM J. Math. Data Sci. 2024 (arXiv 2301.12554); code ``Bai-YT/AdaptiveSmoothing``
(``adaptive_smoothing/losses.py`` ``CompLoss``, ``trainer.py`` ``get_data_buffer`` / ``train_epoch``,
``attacks.py`` ``comp_pgd_attack``). The model is a ``mix`` composite with a mixing network
(``robustkit.mix``; ``robustkit mix --mixing-net``); only the mixing network (and its output BN) learns:
the members are frozen when the composite is built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses._adversarial import AdversarialObjective, check_positive, reduce
from robustkit.errors import InputError
from robustkit.mix import mixed_part
from robustkit.registry import DEFENSES
from robustkit.threat import ThreatModel

# The code's attack budgets: CIFAR-10 / -100 L-inf 8/255 (``pgd_settings.eps: default``); MNIST is ours (0.3,
# the usual MNIST budget). Steps / step size: see the class docstring (the code draws them at random).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "steps": 10, "step_size": 2.5 * 8 / 255 / 10},
    "mnist": {"eps": 0.3, "steps": 10, "step_size": 0.075},
}


@DEFENSES.register("adaptive-smoothing", help="adaptive smoothing (Bai et al. 2024): train the mixing network of "
                                               "a mix composite (members frozen) on clean vs adversarial inputs")
class AdaptiveSmoothing(AdversarialObjective):
    """The code's composite loss on a batch of clean and adversarial images of the mixed classifier.

    Per image ``u`` with label ``y``, mixing logit ``gamma(u)`` (``alpha = sigmoid(gamma)``) and supervision
    ``s`` (0 for clean images: lean on the accurate member; 1 for adversarial ones: lean on the robust member)::

        loss(u) = c_bce * BCE(gamma(u), s) + c_ce * CE(h_mix(u), y) + c_prod * BCE(gamma(u), s) * CE(h_mix(u), y)

    averaged over the ``2B`` images (code ``CompLoss``; CIFAR configs ``consts: bce 1.5, ce 0, prod 0.3``, the
    defaults here). Clean and adversarial images go through the mixer in one batch (the code's data buffer
    mixes them so that the mixing network's BN sees both). The adversarial images attack the *composite*
    (adaptive: through the mixing network), in eval mode, by PGD on the mixed classifier's cross-entropy
    from a uniform random start, each image with its own budget ``eps * U(eps_low, eps_high)`` (code
    ``randomized_attack_settings``: ``eps_factor_loc 0.4``, ``eps_factor_scale 0.7``, i.e. U(0.4, 1.1)).

    Where we differ from the code: it draws the number of steps from ``chi2(75)``, the step from
    ``5 * eps_i / steps``, a momentum decay at random, and uses APGD with targeted losses for CIFAR; we run
    ``steps`` fixed signed-gradient (L-inf) / normalized (L2) steps of ``step_size * eps_i / eps`` (the step
    scales with each image's budget). It accumulates 4 mini-batches per optimizer step with AdamW(lr 5e-5);
    optimizer, schedule and accumulation are the Trainer's here.

    Args (keyword-only; ``None`` takes the ``preset``'s value):
        preset: ``"cifar10"`` (eps 8/255, 10 steps of 2/255) or ``"mnist"`` (eps 0.3, 10 steps of 0.075).
        norm, eps, steps, step_size: the training attack. eps_low, eps_high: its budget factors (0.4, 1.1).
        c_bce, c_ce, c_prod: the loss weights (1.5, 0, 0.3).
    """

    name = "adaptive-smoothing"
    PRESETS = PRESETS

    def __init__(self, *, preset: str | None = "cifar10", norm: str = "linf", eps: float | str | None = None,
                 steps: int | None = None, step_size: float | str | None = None, eps_low: float = 0.4,
                 eps_high: float = 1.1, c_bce: float = 1.5, c_ce: float = 0.0, c_prod: float = 0.3) -> None:
        self._setup(preset, norm, eps, steps, step_size, 0.0, None)
        self.eps_low = check_positive("eps_low", eps_low, allow_zero=True)
        self.eps_high = check_positive("eps_high", eps_high)
        if self.eps_low > self.eps_high:
            raise InputError(f"eps_low must be <= eps_high, got {eps_low} > {eps_high}")
        self.c_bce = check_positive("c_bce", c_bce, allow_zero=True)
        self.c_ce = check_positive("c_ce", c_ce, allow_zero=True)
        self.c_prod = check_positive("c_prod", c_prod, allow_zero=True)
        if self.c_bce == self.c_ce == self.c_prod == 0:
            raise InputError("adaptive-smoothing: at least one of c_bce, c_ce, c_prod must be > 0")

    @staticmethod
    def _mixed(model: nn.Module):  # -> MixedNet
        net = mixed_part(model)
        if net is None or net.mixer is None:
            raise InputError("adaptive-smoothing trains the mixing network of a mix composite: build the model "
                             "with `robustkit mix --standard RUN --robust RUN --mixing-net --out DIR` and train "
                             "with --pretrained DIR")
        return net

    def check_model(self, model: nn.Module) -> None:
        """``InputError`` unless ``model`` is a ``mix`` composite with a mixing network (the train pipeline asks
        before anything is written)."""
        self._mixed(model)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial images of the composite ``(B, C, H, W)``, per-image budgets (eval mode, last iterate)."""
        self._mixed(model)
        x = x.detach()
        factor = self.eps_low + (self.eps_high - self.eps_low) * torch.rand(x.shape[0], device=x.device)  # (B,)
        return self.ce_ascent(model, x, y, "uniform", tm=ThreatModel(self.norm, self.eps * factor),
                              step_size=self.step_size * factor)                              # (B,) budgets

    def objective(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, Any]]:
        net = self._mixed(model)
        b = x.shape[0]
        logits = model(torch.cat([x, x_adv]))                               # (2B, K) log mixed probabilities
        gamma = net.gamma                                                   # (2B,) the mixer's logit
        if gamma is None:
            raise InputError("adaptive-smoothing: the composite returned no mixing logit")
        labels = torch.cat([y, y])                                          # (2B,)
        sup = torch.cat([torch.zeros(b), torch.ones(b)]).to(gamma)          # (2B,) 0 clean -> STD, 1 adv -> ROB
        ce = F.cross_entropy(logits.float(), labels, reduction="none")      # (2B,)
        bce = F.binary_cross_entropy_with_logits(gamma.float(), sup, reduction="none")   # (2B,)
        per = self.c_bce * bce + self.c_ce * ce + self.c_prod * bce * ce    # (2B,)
        per = (per[:b] + per[b:]) / 2                                       # (B,) per input image
        loss = reduce(per, reduction)
        with torch.no_grad():
            alpha = torch.sigmoid(gamma.float())
            pred = logits.argmax(1) == labels
        logs = {"loss": float(loss.detach().mean()), "clean_accuracy": float(pred[:b].float().mean()),
                "robust_accuracy": float(pred[b:].float().mean()), "alpha_clean": float(alpha[:b].mean()),
                "alpha_adv": float(alpha[b:].mean()), "bce": float(bce.detach().mean())}
        return loss, logs
