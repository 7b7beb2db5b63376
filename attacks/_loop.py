"""The one active-set loop that PGD and APGD are written on.

A run attacks *rows*: copies of the samples still standing (``owners``, global indices; with
``copies > 1`` each owner has that many rows, i.e. batched random restarts). Each step is

1. one forward of the active rows (autocast / channels_last per ``LoopOptions``), the loss from
   ``attacks._losses``, the goal test, and the gradient w.r.t. the *input only*
   (``torch.autograd.grad``; no parameter gradients; none on the last iterate);
2. the per-row best-so-far: the first iterate that reached the goal, else the highest-loss one;
3. every ``every`` steps, compaction: rows whose owner reached the goal are folded into the
   ``Record`` and leave the batch (a ``nonzero``, a second one when rows leave: the loop's only
   host syncs, so on an accelerator ``every = 4`` lets finished rows ride along a few steps);
4. the ``rule``'s step to the next iterate (PGD: a fixed step; APGD: its step-size rule).

Per-row state lives in one dict of tensors that share dim 0, so compaction indexes all of them
alike, whatever state a rule keeps. Success is read from the forward that also gives the
gradient (iterate ``t``'s logits judge iterate ``t``): a run of ``steps`` steps costs ``steps + 1``
forwards and ``steps`` backwards per row that stays active. Compaction never changes a row's
trajectory, so the result is the same with or without it (up to float effects of batch size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from attacks._compact import autocast, expand_as_image, fmt_input
from attacks._losses import LossFn
from robustkit.threat import ThreatModel

Rows = dict[str, torch.Tensor]


@dataclass
class Record:
    """Per-sample result over all runs of one attack call, for a global batch of ``B``."""

    x: torch.Tensor        # (B, C, H, W) first iterate that reached the goal, else the highest-loss iterate
    loss: torch.Tensor     # (B,) loss of ``x`` while not fooled (``new_stage`` resets it)
    fooled: torch.Tensor   # (B,) bool, the goal was reached
    queries: torch.Tensor  # (B,) int64 forward passes spent on the sample
    forward: int = 0       # sample-weighted forward passes
    backward: int = 0      # sample-weighted backward passes
    calls: int = 0         # batched model calls

    @classmethod
    def start(cls, x: torch.Tensor, fooled: torch.Tensor | None = None) -> Record:
        b, dev = x.shape[0], x.device
        return cls(x.clone(), torch.full((b,), float("-inf"), device=dev),
                   torch.zeros(b, dtype=torch.bool, device=dev) if fooled is None else fooled.clone(),
                   torch.zeros(b, dtype=torch.long, device=dev))

    def new_stage(self, owners: torch.Tensor) -> None:
        """A new loss begins (losses of different stages do not compare): forget the best loss."""
        self.loss[owners] = float("-inf")

    def info(self) -> dict[str, object]:
        return {"forward_passes": self.forward, "backward_passes": self.backward, "model_calls": self.calls,
                "count_unit": "sample-weighted passes (sum over samples)"}


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs: compaction period (``None``: never), autocast, memory format, RNG."""

    every: int | None = 1
    amp: bool = False
    channels_last: bool = False
    generator: torch.Generator | None = None

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            return model(fmt_input(x, self.channels_last))


class StepRule(Protocol):
    uses_loss: bool   # the rule reads ``loss`` / ``better`` (else the loop does not keep them per row)

    def step(self, t: int, rows: Rows, tm: ThreatModel) -> torch.Tensor:
        """The next iterate ``(N, C, H, W)`` from iterate ``t``: ``rows`` holds ``x``, ``x0``, ``g``
        (gradient at ``x``), ``bx``/``bl`` (best-so-far point and loss) and, if ``uses_loss``, ``loss``
        and ``better`` (where ``x`` became the best); a rule may add its own per-row state to ``rows``."""
        ...


@dataclass
class FixedStep:
    """Projected steepest ascent with a fixed step length (PGD, Madry et al. 2018)."""

    eta: float
    uses_loss = False

    def step(self, t: int, rows: Rows, tm: ThreatModel) -> torch.Tensor:
        return tm.project(tm.step(rows["x"], rows["g"], self.eta), rows["x0"])


def run(model: nn.Module, x: torch.Tensor, label: torch.Tensor, record: Record, tm: ThreatModel,
        rule: StepRule, loss: LossFn, steps: int, owners: torch.Tensor, opts: LoopOptions, *, copies: int = 1,
        target: torch.Tensor | None = None, targeted: bool = False, random_start: bool = True) -> None:
    """One run of ``steps`` steps on ``copies`` rows per owner in ``owners (M,)``; folds into ``record``.

    x: (B, C, H, W) clean images; label: (B,) true labels (untargeted) or target classes
    (``targeted``, goal: ``argmax == label``); target: (B,) classes for untargeted ``dlr-targeted``.
    """
    if owners.numel() == 0:
        return
    own = owners.repeat(copies) if copies > 1 else owners                 # (N,)
    x0 = x[own]                                                            # (N, C, H, W)
    xa = tm.random_start(x0, opts.generator) if random_start else x0.clone()
    rows: Rows = {"own": own, "x0": x0, "label": label[own], "x": xa, "bx": xa,
                  "bl": torch.full((own.numel(),), float("-inf"), device=x.device),
                  "hit": torch.zeros(own.numel(), dtype=torch.bool, device=x.device)}
    if target is not None:
        rows["target"] = target[own]
    unique = copies == 1
    if not unique:
        rows["hit_t"] = torch.zeros(own.numel(), dtype=torch.long, device=x.device)
    for t in range(steps + 1):
        last = t == steps
        xa = rows["x"].detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            logits = opts.forward(model, xa)                               # (N, K)
            lv = loss(logits, rows["label"], rows.get("target"))           # (N,)
        n = xa.shape[0]
        record.forward, record.calls = record.forward + n, record.calls + 1
        if not last:
            (rows["g"],) = torch.autograd.grad(lv.sum(), xa)               # input gradient only
            record.backward += n
        pred = logits.argmax(1)
        succ = (pred == rows["label"]) if targeted else (pred != rows["label"])
        _update(rows, xa.detach(), lv.detach(), succ, t, rule.uses_loss)
        if last:
            break
        if opts.every is not None and (t + 1) % opts.every == 0:
            kept = _compact(rows, record, t + 1, unique)
            if kept is None:
                return
            rows = kept
        with torch.no_grad():
            rows["x"] = rule.step(t, rows, tm)
    _settle(rows, record, steps + 1, unique)


def _update(rows: Rows, xa: torch.Tensor, lv: torch.Tensor, succ: torch.Tensor, t: int, keep_loss: bool) -> None:
    """Per-row best-so-far, without a host sync: a row that reached the goal keeps its first
    successful iterate; until then the highest-loss iterate (strict ``>``: the earliest on ties)."""
    hit = rows["hit"]
    better = ~hit & (succ | (lv > rows["bl"]))
    rows["bx"] = torch.where(expand_as_image(better, xa), xa, rows["bx"])
    rows["bl"] = torch.where(better, lv, rows["bl"])
    if "hit_t" in rows:
        rows["hit_t"] = torch.where(succ & ~hit, t, rows["hit_t"])
    rows["hit"] = hit | succ
    if keep_loss:
        rows["loss"], rows["better"] = lv, better


def _owner_done(rows: Rows, b: int, unique: bool) -> torch.Tensor:
    """``(N,)`` bool: the row's owner reached the goal in some row of this run."""
    if unique:
        return rows["hit"]
    hits = torch.zeros(b, dtype=torch.int32, device=rows["hit"].device).index_add_(0, rows["own"],
                                                                                  rows["hit"].int())
    return hits[rows["own"]] > 0


def _take(rows: Rows, idx: torch.Tensor) -> Rows:
    return {k: v[idx] for k, v in rows.items()}


def _compact(rows: Rows, record: Record, n_forwards: int, unique: bool) -> Rows | None:
    """Fold the rows of owners that reached the goal into ``record`` and drop them (``None``: no
    row left). One host sync (``nonzero``); a second only when some rows leave."""
    done = _owner_done(rows, record.fooled.shape[0], unique)
    keep = (~done).nonzero().squeeze(1)
    if keep.numel() == done.shape[0]:
        return rows
    leave = done.nonzero().squeeze(1)                                      # every owner here is done
    own = rows["own"][leave]
    record.queries.index_add_(0, own, torch.full_like(own, n_forwards))
    if not unique:                                                         # the first hit of each owner
        leave = leave[rows["hit"][leave]]
        leave = leave[_first(rows["hit_t"][leave] * done.shape[0] + leave, rows["own"][leave], record.fooled.shape[0])]
        own = rows["own"][leave]
    record.x[own] = rows["bx"][leave]
    record.fooled[own] = True
    return _take(rows, keep) if keep.numel() else None


def _first(keys: torch.Tensor, owners: torch.Tensor, b: int) -> torch.Tensor:
    """``(n,)`` bool: the row with the smallest (unique) key of each owner, so that writes
    ``out[owners[mask]] = ...`` have unique targets (duplicate-index writes are nondeterministic)."""
    best = torch.full((b,), torch.iinfo(torch.long).max, dtype=torch.long, device=keys.device)
    return keys == best.scatter_reduce(0, owners, keys, "amin")[owners]


def _settle(rows: Rows, record: Record, n_forwards: int, unique: bool) -> None:
    """Fold ``rows`` (each active for ``n_forwards`` forwards) into ``record``: owners that reached
    the goal take their first successful iterate (earliest step, then lowest row); the others
    their highest-loss iterate over their rows (first row on ties) if it beats ``record.loss``."""
    own, b = rows["own"], record.fooled.shape[0]
    record.queries.index_add_(0, own, torch.full_like(own, n_forwards))
    done = _owner_done(rows, b, unique)
    hit = rows["hit"].nonzero().squeeze(1)                                 # (h,) rows that succeeded
    if not unique and hit.numel():
        hit = hit[_first(rows["hit_t"][hit] * own.numel() + hit, own[hit], b)]
    record.x[own[hit]] = rows["bx"][hit]
    record.fooled[own[hit]] = True
    rest = (~done).nonzero().squeeze(1)                                    # rows of owners still standing
    if rest.numel() == 0:
        return
    o, bl = own[rest], rows["bl"][rest]
    win = bl > record.loss[o]
    if not unique:
        top = torch.full((b,), float("-inf"), device=bl.device).scatter_reduce(0, o, bl, "amax")
        win &= bl >= top[o]
    w = rest[win]
    if not unique and w.numel():
        w = w[_first(w, own[w], b)]
    record.x[own[w]] = rows["bx"][w]
    record.loss[own[w]] = rows["bl"][w]


def logits_counted(model: nn.Module, x: torch.Tensor, record: Record, opts: LoopOptions) -> torch.Tensor:
    """Logits ``(B, K)`` of ``x`` in float32 without gradients (one counted forward per sample)."""
    with torch.no_grad():
        logits = opts.forward(model, x).float()
    record.queries += 1
    record.forward, record.calls = record.forward + x.shape[0], record.calls + 1
    return logits


def judge(model: nn.Module, x_adv: torch.Tensor, label: torch.Tensor, targeted: bool, record: Record,
          opts: LoopOptions) -> torch.Tensor:
    """Goal reached, judged on ``x_adv (B, C, H, W)`` itself (one counted forward): ``(B,)`` bool."""
    pred = logits_counted(model, x_adv, record, opts).argmax(1)
    return (pred == label) if targeted else (pred != label)
