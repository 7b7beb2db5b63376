"""Accuracy over a loader: clean accuracy, and the one evaluation engine for attacks.

``evaluate_attacks`` runs a list of attacks in one of two modes:

- ``chained`` (AutoAttack-style, Croce & Hein 2020): each attack runs only on the points still
  standing, so a point is robust only if every attack failed on it; the cost tracks the
  points left. ``robustkit attack`` uses it.
- ``independent``: every attack runs on every clean-correct point, so per-attack accuracies
  are comparable (RobustBench-style tables); robust = no attack broke it. ``robustkit
  benchmark`` uses it.

In both modes every claimed success is **verified** before it counts: the model's label on
``x_adv`` really differs from ``y`` (targeted attacks: equals the target), and ``x_adv`` lies
inside the threat model's ball and ``[0, 1]`` (``ThreatModel.contains``). Claims that fail are
counted as ``unverified`` and the point stays standing. The engine imports no attack: an
attack is any callable ``attack(model, x, y) -> AttackResult``-like (``x_adv``, ``success``,
``queries``, ``info``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkit._evaluation import MODES, AttackStats, Columns, Evaluation
from robustkit._verify import ball_of, inside, targets
from robustkit.errors import InputError
from robustkit.modes import device_of, eval_mode
from robustkit.threat import ThreatModel
from robustkit.validate import integer, one_of

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _autocast(dev: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(dev.type, enabled=amp and dev.type != "cpu")


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Predicted labels ``(N,)`` for images ``(N, C, H, W)`` in ``[0, 1]``, in eval mode."""
    dev = device_of(model)
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            with _autocast(dev, amp):
                out.append(model(x[i:i + batch_size].to(dev)).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def clean_accuracy(model: nn.Module, loader: Batches, amp: bool = False, progress: bool = False,
                   desc: str = "clean") -> dict[str, Any]:
    """``{"clean_accuracy", "n", "correct" (N,) bool, "seconds"}`` over ``loader``."""
    dev = device_of(model)
    t0 = time.perf_counter()
    correct = []
    with eval_mode(model):
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            with _autocast(dev, amp):
                correct.append((model(x.to(dev)).argmax(1) == y.to(dev)).cpu())
    c = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return {"clean_accuracy": float(c.float().mean()) if c.numel() else 0.0, "n": int(c.numel()),
            "correct": c, "seconds": time.perf_counter() - t0}


# -- the engine -------------------------------------------------------------------------------
def attack_list(attack_or_attacks: Any) -> list[Any]:
    attacks = list(attack_or_attacks) if isinstance(attack_or_attacks, (list, tuple)) else [attack_or_attacks]
    if not attacks:
        raise InputError("need at least one attack")
    for a in attacks:
        if not callable(a):
            raise InputError(f"not an attack: {a!r} (build one with robustkit.app.build.build_attack)")
    return attacks


def attack_labels(attacks: list[Any]) -> list[str]:
    """Display names, made unique when the list repeats an attack (``pgd``, ``pgd#2``)."""
    out: list[str] = []
    for a in attacks:
        name = str(getattr(a, "name", type(a).__name__))
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


def _scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able per-call facts of an attack's ``info`` (package, version, stage names)."""
    ok = (str, int, float, bool, type(None))
    return {k: v for k, v in info.items() if k != "broken_by" and (isinstance(v, ok) or (
        isinstance(v, list) and all(isinstance(e, ok) for e in v)))}


@dataclass(frozen=True)
class _Options:
    mode: str
    threat: ThreatModel | None
    batch_size: int | None
    amp: bool
    seed: int


class _Batch:
    """One batch of ``B`` points on the device and what the attacks did to it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, start: int, index: int, n_attacks: int, keep: bool) -> None:
        b, dev = x.shape[0], x.device           # start: position in this call; index: global image index
        self.x, self.y, self.start, self.index = x, y, start, torch.arange(index, index + b, device=dev)
        self.attacked = torch.zeros(n_attacks, b, dtype=torch.bool, device=dev)
        self.broken = torch.zeros_like(self.attacked)
        self.unverified = torch.zeros_like(self.attacked)
        self.broken_by = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.l2, self.linf = torch.zeros(b, device=dev), torch.zeros(b, device=dev)
        self.queries = torch.zeros(b, dtype=torch.long, device=dev)
        self.q_success = torch.full((b,), -1, dtype=torch.long, device=dev)
        self.x_adv = x.clone() if keep else None
        self.num_classes = 0


def evaluate_attacks(model: nn.Module, data: Batches | tuple[torch.Tensor, torch.Tensor], attacks: Any, *,
                     mode: str = "chained", threat: ThreatModel | None = None, batch_size: int | None = None,
                     amp: bool = False, seed: int = 0, keep_adversarials: bool = False, progress: bool = False,
                     desc: str = "attack", start: int = 0) -> Evaluation:
    """Run ``attacks`` (one or a list) over ``data`` in ``mode``, verifying every claimed success.

    Args:
        data: a loader of ``(x (B, C, H, W), y (B,))`` batches, or one ``(x, y)`` pair of tensors.
        mode: ``chained`` or ``independent`` (see the module docstring).
        threat: the ball claims are checked against; default: each attack's own ``norm`` / ``eps``
            (an attack without ``eps``, e.g. minimum-norm DeepFool, is checked against ``[0, 1]``).
        batch_size: points per attack call; ``None``: all active points of a loader batch in one
            call. Attacks that batch themselves (a ``batch_size`` attribute, e.g. AutoAttack) always
            get every active point of the batch at once.
        amp: autocast (CUDA) for the clean pass and the check; attacks carry their own ``amp``.
        seed: targeted attacks get a wrong class per image, a hash of ``(seed, image index,
            attack position)`` (``targets``); "broken" then means "target reached".
        keep_adversarials: also return ``x`` and ``x_adv`` (CPU).
        start: the global index of the first point of ``data`` (the seeded targets depend on an
            image's index, not on its position in this call): a shard or batch of a larger
            evaluation passes its offset, so it gets exactly the targets of the whole run.
    """
    attacks = attack_list(attacks)
    labels = attack_labels(attacks)
    opt = _Options(one_of("mode", mode, MODES), threat, None if batch_size is None else
                   integer("batch_size", batch_size, 1), amp, seed)
    start = integer("start", start, 0)
    batches: Batches = [data] if isinstance(data, tuple) and isinstance(data[0], torch.Tensor) else data
    dev = device_of(model)
    stats = [AttackStats(name, params=a.params() if hasattr(a, "params") else {}) for name, a in zip(labels, attacks)]
    subs: list[list[str | None]] = [[] for _ in attacks]
    cols, counts, clean_s = Columns(), {"clean": 0, "verify": 0}, 0.0
    t0 = time.perf_counter()
    bar = tqdm(desc=desc, unit="img", disable=not progress, leave=False)
    for x, y in batches:
        bt = _Batch(x.to(dev), y.to(dev, torch.long), counts["clean"], start + counts["clean"], len(attacks),
                    keep_adversarials)
        counts["clean"] += x.shape[0]
        t_clean = time.perf_counter()
        pred, bt.num_classes = _predict_on(model, bt.x, opt.batch_size, amp)  # (B,), K
        clean_s += time.perf_counter() - t_clean
        correct = pred == bt.y
        for s in subs:
            s.extend([None] * x.shape[0])
        for i, atk in enumerate(attacks):
            pool = correct & (bt.broken_by < 0) if opt.mode == "chained" else correct
            act = pool.nonzero().squeeze(1)                                   # (M,) points to attack
            step = max(act.numel() if opt.batch_size is None or hasattr(atk, "batch_size") else opt.batch_size, 1)
            bar.set_postfix_str(labels[i], refresh=False)
            for start in range(0, act.numel(), step):
                j = act[start:start + step]
                counts["verify"] += _attack_chunk(model, atk, i, bt, j, stats[i], subs[i], opt)
                bar.update(int(j.numel()))
        cols.add(correct=correct, pred=pred, y=bt.y, attacked=bt.attacked, broken=bt.broken,
                 unverified=bt.unverified, broken_by=bt.broken_by, l2=bt.l2, linf=bt.linf, queries=bt.queries,
                 q_success=bt.q_success)
        if bt.x_adv is not None:
            cols.add(x=bt.x, x_adv=bt.x_adv)
    bar.close()
    a = len(attacks)
    return Evaluation(
        mode=opt.mode, attacks=labels, clean_correct=cols.cat("correct", dtype=torch.bool),
        attacked=cols.cat("attacked", 1, (a, 0), torch.bool), broken=cols.cat("broken", 1, (a, 0), torch.bool),
        unverified=cols.cat("unverified", 1, (a, 0), torch.bool), broken_by=cols.cat("broken_by", dtype=torch.long),
        l2=cols.cat("l2"), linf=cols.cat("linf"), queries=cols.cat("queries", dtype=torch.long),
        queries_to_success=cols.cat("q_success", dtype=torch.long), y=cols.cat("y", dtype=torch.long),
        pred_clean=cols.cat("pred", dtype=torch.long), sub_attacks=subs, stats=stats,
        seconds=time.perf_counter() - t0, clean_seconds=clean_s, clean_forward=counts["clean"],
        verify_forward=counts["verify"],
        x=cols.cat("x") if keep_adversarials else None, x_adv=cols.cat("x_adv") if keep_adversarials else None)


@torch.no_grad()
def _predict_on(model: nn.Module, x: torch.Tensor, batch_size: int | None, amp: bool) -> tuple[torch.Tensor, int]:
    """Labels ``(B,)`` of ``x (B, C, H, W)`` on its device (eval mode, chunks of ``batch_size``) and
    the number of classes (logit columns)."""
    step = max(batch_size or x.shape[0], 1)
    out, k = [], 0
    with eval_mode(model), _autocast(x.device, amp):
        for i in range(0, x.shape[0], step):
            logits = model(x[i:i + step])                                      # (b, K)
            out.append(logits.argmax(1))
            k = int(logits.shape[1])
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)), k


def _attack_chunk(model: nn.Module, atk: Any, i: int, bt: _Batch, j: torch.Tensor, st: AttackStats,
                  subs: list[str | None], opt: _Options) -> int:
    """Attack points ``j (M,)`` of the batch, verify the claims, fold the result into ``bt`` and ``st``.
    Returns the forward passes the check spent."""
    targeted = bool(getattr(atk, "targeted", False))
    goal = targets(bt.y[j], bt.index[j], bt.num_classes, opt.seed, i) if targeted else bt.y[j]   # (M,)
    t0 = time.perf_counter()
    res = atk(model, bt.x[j], goal)
    claimed = res.success.to(bt.x.device).bool()                                       # (M,)
    x_adv = res.x_adv.detach().to(bt.x.device, bt.x.dtype)                             # (M, C, H, W)
    ok = torch.zeros_like(claimed)
    c = claimed.nonzero().squeeze(1)
    if c.numel():
        pred = _predict_on(model, x_adv[c], opt.batch_size, opt.amp)[0]
        hit = pred == goal[c] if targeted else pred != goal[c]
        ok[c] = hit & inside(*ball_of(atk, opt.threat), x_adv[c], bt.x[j[c]])
    q = res.queries.to(bt.x.device).long()                                             # (M,)
    fresh = bt.broken_by[j] < 0                                  # not broken by an earlier attack
    first = ok & fresh
    hit_idx = j[first]
    bt.attacked[i, j], bt.broken[i, j], bt.unverified[i, j] = True, ok, claimed & ~ok
    bt.queries[j] += q
    bt.broken_by[hit_idx] = i
    delta = (x_adv[first] - bt.x[hit_idx]).flatten(1)
    bt.l2[hit_idx], bt.linf[hit_idx] = delta.norm(dim=1), delta.abs().amax(1)
    bt.q_success[hit_idx] = q[first]
    if bt.x_adv is not None:
        bt.x_adv[j[fresh]] = x_adv[fresh]
    sub = res.info.get("broken_by")
    if isinstance(sub, list):                                    # an ensemble names its sub-attack per point
        for m in ok.nonzero().squeeze(1).tolist():
            subs[bt.start + int(j[m])] = sub[m]
    st.attacked += int(j.numel())
    st.broken += int(ok.sum())
    st.unverified += int((claimed & ~ok).sum())
    st.seconds += time.perf_counter() - t0
    st.forward_passes += int(res.info.get("forward_passes", int(q.sum())))
    st.backward_passes += int(res.info.get("backward_passes", 0))
    st.meta.update(_scalars(res.info))
    return int(c.numel())


# -- the long-standing fronts (chained) ---------------------------------------------------------
def robust_accuracy(model: nn.Module, loader: Batches, attack_or_attacks: Any, progress: bool = False,
                    amp: bool = False, seed: int = 0) -> dict[str, Any]:
    """Robust accuracy of ``model`` over ``loader`` under one attack or a chain of attacks.

    Only clean-correct samples are attacked. A list is chained like AutoAttack (Croce & Hein
    2020): each later attack runs only on the points still robust, so a point counts as robust
    only if every attack failed on it (worst case per point). Every claimed success is verified
    (see ``evaluate_attacks``). ``amp`` applies to the clean pass and the check.

    Returns a dict with
        ``clean_accuracy``, ``robust_accuracy``, ``attack_success_rate`` (broken / clean-correct),
        ``n``, ``mode``, ``attacks`` (names), ``seconds``, ``unverified`` (claims that failed the
        check), ``forward_passes`` / ``backward_passes`` (sample-weighted totals incl. the clean
        pass and the check), ``per_attack`` (attacked, broken, unverified, seconds, passes,
        robust_accuracy after it), ``mean_l2`` / ``median_l2`` / ``mean_linf`` of ``x_adv - x``
        over the broken points (None when none broke), and per-sample ``(N,)`` CPU tensors / lists:
        ``clean_correct``, ``success`` (broken), ``robust``, ``broken_by`` (attack name or None),
        ``l2``, ``linf`` (0 where not broken), ``queries`` (model queries spent by the chain),
        ``queries_to_success`` (queries of the breaking attack, -1 if unbroken), ``y``, ``pred_clean``.
    """
    return evaluate_attacks(model, loader, attack_or_attacks, amp=amp, seed=seed, progress=progress).summary()


def adversarial_examples(model: nn.Module, loader: Batches, attack_or_attacks: Any, progress: bool = False,
                         amp: bool = False, seed: int = 0) -> dict[str, Any]:
    """``robust_accuracy`` plus the images: ``x`` and ``x_adv`` ``(N, C, H, W)`` on CPU (for
    ``--save-adversarials``) and ``pred_adv (N,)``, the model's labels on ``x_adv``."""
    out = evaluate_attacks(model, loader, attack_or_attacks, amp=amp, seed=seed, progress=progress,
                           keep_adversarials=True).summary()
    out["pred_adv"] = predict(model, out["x_adv"], amp=amp)
    return out

