"""The evaluation engine sharded over ``torchrun`` processes, resumable per batch.

The selected images ``x (N, C, H, W)`` are cut into fixed batches of positions
``[k*B, (k+1)*B)``; each batch is one unit of ``robustkit.app.shard.map_units`` and runs through
the one engine (``robustkit.evaluate.evaluate_attacks``) with its global offset ``k*B``. A batch
therefore sees exactly the same inputs, attack calls, random starts (an attack's seeded
generator restarts at every call) and per-image targets whatever the number of processes or the
interruption pattern, so the joined ``Evaluation`` is identical per image (and in every total) to
a one-process run. Each batch's record (``Evaluation.to_record``) is saved atomically the moment
it is done under ``store_dir``; ``resume`` computes only the batches missing there.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robustkit._evaluation import MODES, Evaluation
from robustkit.app.shard import UnitStore, all_gather, map_units, prepare, union
from robustkit.errors import CheckpointError, InputError
from robustkit.evaluate import attack_labels, attack_list, evaluate_attacks
from robustkit.threat import ThreatModel
from robustkit.validate import integer, one_of
from robustkit.zoo import fingerprint


def check_output_dir(out: str | Path) -> None:
    """``InputError`` unless ``out`` is (or can be created as) a writable directory; creates nothing,
    so it can run before any work."""
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        raise InputError(f"output directory {out} {where}; give --out a directory path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"output directory {out}: {probe} is not writable; give --out a writable directory")


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """16 hex digits of a SHA-256 over the raw bytes of ``x`` and ``y`` (part of the resume key)."""
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resume_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Any, *, batch_size: int, mode: str,
               threat: ThreatModel | None, seed: int, amp: bool, keep_adversarials: bool) -> dict[str, Any]:
    """Everything a batch's record depends on: weights, images, attacks and their parameters, the
    engine's settings. A store written under another key is not resumed from."""
    atks = attack_list(attacks)
    return {"weights": fingerprint(model), "data": data_fingerprint(x, y), "n": int(x.shape[0]),
            "attacks": attack_labels(atks), "params": [a.params() if hasattr(a, "params") else {} for a in atks],
            "batch_size": batch_size, "mode": mode, "seed": seed, "amp": amp, "keep_adversarials": keep_adversarials,
            "threat": None if threat is None else [threat.norm, float(threat.eps)]}


def auto_resume(store: UnitStore) -> dict[int, dict[str, Any]]:
    """The batches to keep when resuming "when we can": every rank's progress files if all of them
    were written under ``store.key`` and are readable, else none (rank 0 clears the store). Reads
    each file once. A collective: every rank calls it (the benchmark's resume)."""
    try:
        mine, ok = store.done(), True
    except (InputError, CheckpointError):
        mine, ok = {}, False
    return union(mine) if all(all_gather(ok)) else prepare(store, False)


def evaluate_sharded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Any, *, batch_size: int,
                     mode: str = "chained", threat: ThreatModel | None = None, store_dir: str | Path | None = None,
                     resume: bool | Literal["auto"] = False, key: dict[str, Any] | None = None, seed: int = 0,
                     amp: bool = False, keep_adversarials: bool = False, progress: bool = False,
                     desc: str = "attack") -> Evaluation:
    """``evaluate_attacks`` over ``x (N, C, H, W)``, ``y (N,)`` in fixed batches of ``batch_size``
    points, shared out over the torchrun ranks; every rank returns the whole ``Evaluation``.

    Per batch the engine gets ``batch_size`` as its attack-call size (one call per attack per
    batch; attacks that batch themselves get the batch's active points). ``store_dir``: each
    batch's record is saved there (``unit-<k>.json`` / ``.safetensors``) when done; ``resume``:
    keep the batches already there (``InputError`` if they were made with other settings,
    ``key`` adds the caller's); ``"auto"``: keep them when every rank's files match the settings,
    else start afresh; ``False``: rank 0 clears the store first. ``seconds`` of the
    result: the wall-clock of this call (restored batches cost none); the per-attack ``seconds``
    are compute time summed over the batches, whichever rank ran them.
    """
    batch_size = integer("batch_size", batch_size, 1)
    mode = one_of("mode", mode, MODES)
    atks = attack_list(attacks)
    n = int(x.shape[0])
    if n < 1 or y.shape[:1] != x.shape[:1]:
        raise InputError(f"need images (N, C, H, W) and labels (N,) with N >= 1, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    t0 = time.perf_counter()
    store, done = None, None
    if store_dir is not None:
        full = {**resume_key(model, x, y, atks, batch_size=batch_size, mode=mode, threat=threat, seed=seed, amp=amp,
                             keep_adversarials=keep_adversarials), **(key or {})}
        store = UnitStore(Path(store_dir), full)
        done = auto_resume(store) if resume == "auto" else None         # None: map_units prepares
    units = math.ceil(n / batch_size)

    def compute(k: int) -> dict[str, Any]:
        s = slice(k * batch_size, min((k + 1) * batch_size, n))
        ev = evaluate_attacks(model, (x[s], y[s]), atks, mode=mode, threat=threat, batch_size=batch_size, amp=amp,
                              seed=seed, keep_adversarials=keep_adversarials, progress=False, start=s.start)
        return ev.to_record()

    records = map_units(units, compute, store=store, resume=bool(resume), done=done, progress=progress, desc=desc,
                        weight=lambda k: min((k + 1) * batch_size, n) - k * batch_size)
    ev = Evaluation.concat([Evaluation.from_record(r) for r in records])
    ev.seconds = time.perf_counter() - t0
    return ev
