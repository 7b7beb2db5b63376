"""Accuracy over a loader: clean (here) and robust (attacks). Batched, device-aware, progress bars."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkit.modes import eval_mode


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Predicted labels ``(N,)`` for images ``(N, C, H, W)`` in ``[0, 1]``, in eval mode."""
    dev = _device_of(model)
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def clean_accuracy(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], amp: bool = False,
                   progress: bool = False, desc: str = "clean") -> dict[str, Any]:
    """``{"clean_accuracy", "n", "correct" (N,) bool, "seconds"}`` over ``loader``."""
    dev = _device_of(model)
    t0 = time.perf_counter()
    correct = []
    with eval_mode(model):
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                correct.append((model(x).argmax(1) == y).cpu())
    c = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return {"clean_accuracy": float(c.float().mean()) if c.numel() else 0.0, "n": int(c.numel()),
            "correct": c, "seconds": time.perf_counter() - t0}


# -- robust accuracy (attacks, chained AutoAttack-style) ----------------------------------
def _attack_list(attack_or_attacks: Any) -> list[Any]:
    attacks = list(attack_or_attacks) if isinstance(attack_or_attacks, (list, tuple)) else [attack_or_attacks]
    if not attacks:
        raise ValueError("need at least one attack")
    for a in attacks:
        if not callable(a):
            raise ValueError(f"not an attack: {a!r} (build one with ATTACKS.get(name)(**kwargs))")
    return attacks


def _labels(attacks: list[Any]) -> list[str]:
    """Display names, made unique when the chain repeats an attack (``pgd``, ``pgd#2``)."""
    out: list[str] = []
    for a in attacks:
        name = str(getattr(a, "name", type(a).__name__))
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


def _targets(y: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random wrong class per sample: ``(B,)``."""
    shift = torch.randint(1, k, y.shape, generator=gen).to(y.device)
    return (y + shift) % k


class _Totals:
    """Accumulates per-sample tensors over batches and per-attack counters over the chain."""

    def __init__(self, labels: list[str], keep: bool) -> None:
        self.labels, self.keep = labels, keep
        self.cols: dict[str, list[torch.Tensor]] = {}
        self.per_attack = [{"attack": name, "attacked": 0, "broken": 0, "seconds": 0.0, "forward_passes": 0,
                            "backward_passes": 0} for name in labels]

    def add(self, **cols: torch.Tensor) -> None:
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(v.detach().cpu())

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat(self.cols[key]) if self.cols.get(key) else torch.zeros(0)


def _attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[Any], tot: _Totals,
                  gen: torch.Generator, amp: bool) -> int:
    """Clean-predict ``x (B, C, H, W)``, chain the attacks over the clean-correct points still
    robust, fold everything into ``tot``. Returns the clean forward passes spent."""
    dev = x.device
    with torch.no_grad(), eval_mode(model), torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
        logits = model(x)
    pred = logits.argmax(1)
    correct = pred == y                                                       # (B,)
    b = x.shape[0]
    broken_by = torch.full((b,), -1, dtype=torch.long, device=dev)
    l2, linf = torch.zeros(b, device=dev), torch.zeros(b, device=dev)
    q_total, q_break = torch.zeros(b, dtype=torch.long, device=dev), torch.full((b,), -1, device=dev,
                                                                                dtype=torch.long)
    x_adv = x.clone() if tot.keep else None
    act = correct.nonzero().squeeze(1)
    for i, atk in enumerate(attacks):
        if act.numel() == 0:
            break
        ya = _targets(y[act], logits.shape[1], gen) if getattr(atk, "targeted", False) else y[act]
        t0 = time.perf_counter()
        res = atk(model, x[act], ya)
        s = res.success.to(dev)
        hit = act[s]
        broken_by[hit] = i
        delta = (res.x_adv[s] - x[hit]).flatten(1)
        l2[hit], linf[hit] = delta.norm(dim=1), delta.abs().amax(1)
        q = res.queries.to(dev)
        q_total[act] += q
        q_break[hit] = q[s]
        if x_adv is not None:
            x_adv[act] = res.x_adv.to(x_adv.dtype)
        st = tot.per_attack[i]
        st["attacked"] += int(act.numel())
        st["broken"] += int(hit.numel())
        st["seconds"] += time.perf_counter() - t0
        st["forward_passes"] += int(res.info.get("forward_passes", int(q.sum())))
        st["backward_passes"] += int(res.info.get("backward_passes", 0))
        act = act[~s]
    tot.add(correct=correct, broken_by=broken_by, l2=l2, linf=linf, queries=q_total, queries_to_success=q_break,
            y=y, pred=pred)
    if x_adv is not None:
        tot.add(x=x, x_adv=x_adv)
    return b


def attack_loader(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], attack_or_attacks: Any,
                  progress: bool = False, amp: bool = False, keep_adversarials: bool = False,
                  seed: int = 0) -> dict[str, Any]:
    """Run an attack (or a chain of attacks) over ``loader``; see ``robust_accuracy`` for the keys.

    With ``keep_adversarials`` the dict also holds ``x``, ``x_adv`` ``(N, C, H, W)`` (CPU): per
    sample the adversarial that broke it, else the last attack's output (the clean image for
    points misclassified already). Targeted attacks get a uniformly random wrong class per
    sample (seeded by ``seed``) as target; "broken" then means "target reached".
    """
    attacks = _attack_list(attack_or_attacks)
    labels = _labels(attacks)
    dev = _device_of(model)
    tot = _Totals(labels, keep_adversarials)
    gen = torch.Generator().manual_seed(seed)
    clean_fwd = 0
    t0 = time.perf_counter()
    for x, y in tqdm(loader, desc="attack", disable=not progress, leave=False):
        clean_fwd += _attack_batch(model, x.to(dev), y.to(dev), attacks, tot, gen, amp)
    seconds = time.perf_counter() - t0
    correct, broken_by = tot.cat("correct").bool(), tot.cat("broken_by").long()
    success = broken_by >= 0                                                   # (N,) clean-correct & broken
    robust = correct & ~success
    n = int(correct.numel())
    l2, linf = tot.cat("l2"), tot.cat("linf")
    out: dict[str, Any] = {
        "attacks": labels, "n": n,
        "clean_accuracy": float(correct.float().mean()) if n else 0.0,
        "robust_accuracy": float(robust.float().mean()) if n else 0.0,
        "attack_success_rate": float(success.sum() / correct.sum()) if int(correct.sum()) else 0.0,
        "mean_l2": float(l2[success].mean()) if bool(success.any()) else None,
        "median_l2": float(l2[success].median()) if bool(success.any()) else None,
        "mean_linf": float(linf[success].mean()) if bool(success.any()) else None,
        "seconds": seconds,
        "forward_passes": clean_fwd + sum(p["forward_passes"] for p in tot.per_attack),
        "backward_passes": sum(p["backward_passes"] for p in tot.per_attack),
        "per_attack": tot.per_attack,
        # per-sample (N,) tensors
        "clean_correct": correct, "success": success, "robust": robust,
        "broken_by": [labels[i] if i >= 0 else None for i in broken_by.tolist()],
        "l2": l2, "linf": linf, "queries": tot.cat("queries").long(),
        "queries_to_success": tot.cat("queries_to_success").long(),
        "y": tot.cat("y").long(), "pred_clean": tot.cat("pred").long(),
    }
    if keep_adversarials:
        out["x"], out["x_adv"] = tot.cat("x"), tot.cat("x_adv")
    return out


def robust_accuracy(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], attack_or_attacks: Any,
                    progress: bool = False, amp: bool = False) -> dict[str, Any]:
    """Robust accuracy of ``model`` over ``loader`` under one attack or a chain of attacks.

    Only clean-correct samples are attacked. A list is chained like AutoAttack (Croce & Hein
    2020): each later attack runs only on the points still robust, so a point counts as robust
    only if every attack failed on it (worst case per point). ``amp`` applies to the clean
    forward pass; attacks carry their own ``amp`` option.

    Returns a dict with
        ``clean_accuracy``, ``robust_accuracy``, ``attack_success_rate`` (broken / clean-correct),
        ``n``, ``attacks`` (names), ``seconds``, ``forward_passes`` / ``backward_passes``
        (sample-weighted totals incl. the clean pass), ``per_attack`` (attacked, broken, seconds,
        passes per attack), ``mean_l2`` / ``median_l2`` / ``mean_linf`` of ``x_adv - x`` over the
        broken points (None when none broke), and per-sample ``(N,)`` CPU tensors / lists:
        ``clean_correct``, ``success`` (broken), ``robust``, ``broken_by`` (attack name or None),
        ``l2``, ``linf`` (0 where not broken), ``queries`` (model queries spent by the chain),
        ``queries_to_success`` (queries of the breaking attack, -1 if unbroken), ``y``, ``pred_clean``.
    """
    return attack_loader(model, loader, attack_or_attacks, progress=progress, amp=amp)


def adversarial_examples(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         attack_or_attacks: Any, progress: bool = False, amp: bool = False) -> dict[str, Any]:
    """``robust_accuracy`` plus the images: ``x`` and ``x_adv`` ``(N, C, H, W)`` on CPU (for
    ``--save-adversarials``) and ``pred_adv (N,)``, the model's labels on ``x_adv``."""
    out = attack_loader(model, loader, attack_or_attacks, progress=progress, amp=amp, keep_adversarials=True)
    out["pred_adv"] = predict(model, out["x_adv"], amp=amp)
    return out
