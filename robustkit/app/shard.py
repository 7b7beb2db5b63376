"""Sharding long evaluations over ``torchrun`` processes (one GPU each, or CPU processes on gloo).

    torchrun --nproc_per_node=4 -m robustkit certify ...      # one machine, 4 processes
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
             --nproc_per_node=8 -m robustkit benchmark ...     # two machines

The work is cut into fixed units chosen by the caller (certification: chunks of images, whose
certificates depend only on the run seed and each image's index; attacks: fixed batches of image
positions). The units still missing are dealt round-robin to the ranks; each rank saves a unit's
record atomically the moment it is done (``UnitStore``, resumable: a rerun computes only what
is missing, whatever number of processes it has), and the records are exchanged with a
collective, so no shared file system is needed for the merge and *every* rank returns the full,
ordered result. Only rank 0 writes the final files. One process: the same code, no process group.

NCCL on CUDA, gloo on CPU. The collectives wait up to ``ROBUSTKIT_DIST_TIMEOUT`` seconds
(default one day: a rank may finish its share long before the slowest one). When one process
dies, torchrun stops the others; rerun with ``--resume``.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from robustkit.errors import CheckpointError, InputError
from robustkit.io import atomic_write, atomic_write_json

T = TypeVar("T")
Record = dict[str, Any]


@dataclass(frozen=True)
class World:
    """This process's place among the ``torchrun`` processes (``World()``: a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def world() -> World:
    """From torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; ``World()`` outside torchrun."""
    size = _env_int("WORLD_SIZE", 1)
    w = World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))
    if size < 1 or not 0 <= w.rank < size:
        raise InputError(f"RANK={w.rank} / WORLD_SIZE={size}: need 0 <= RANK < WORLD_SIZE (set by torchrun)")
    return w


def _group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def setup(device: torch.device | str) -> tuple[World, torch.device]:
    """Join the process group under torchrun (once; NCCL for CUDA, else gloo) and return this rank's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``). Outside torchrun: ``(World(), device)``."""
    device = torch.device(device)
    w = world()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {w.local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                             "(use --nproc_per_node <= the number of GPUs)")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = float(os.environ.get("ROBUSTKIT_DIST_TIMEOUT", 86400))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_teardown)
    return w, device


def _teardown() -> None:
    """Destroy the process group at interpreter exit: a gloo group left alive can abort the process at
    shutdown ("terminate called without an active exception", seen once in CI on a resumed run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    g = _group()
    if g is not None and g.get_world_size() > 1:
        if g.get_backend() == "nccl":
            g.barrier(device_ids=[torch.cuda.current_device()])
        else:
            g.barrier()


def all_gather(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    g = _group()
    if g is None or g.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * g.get_world_size()
    g.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    g = _group()
    if g is None or g.get_world_size() == 1:
        return obj
    box = [obj]
    g.broadcast_object_list(box, src=src)
    return box[0]


def check_enough(n_items: int, what: str = "images") -> None:
    """``InputError`` when torchrun started more processes than there are ``what`` to share out."""
    w = world()
    if w.size > n_items:
        raise InputError(f"torchrun started {w.size} processes for {n_items} {what}: use at most {n_items} "
                         f"processes (--nproc_per_node / --nnodes) or more {what}")


def _canon(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class UnitStore:
    """Per-unit progress files under ``root``: ``unit-<id>.json`` (the record's JSON values and the
    settings ``key``) and, when the record holds tensors, ``unit-<id>.safetensors`` (written first;
    the JSON file is the commit). A file written with another ``key`` is an ``InputError`` (resume
    with different settings); an unreadable one a ``CheckpointError``."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.root, self.key = Path(root), _canon(key)

    def _json(self, unit: int) -> Path:
        return self.root / f"unit-{unit:08d}.json"

    def save(self, unit: int, record: Record) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in record.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in record.items() if k not in tensors}
        if tensors:
            from safetensors.torch import save_file

            atomic_write(self._json(unit).with_suffix(".safetensors"), lambda p: save_file(tensors, p))
        atomic_write_json(self._json(unit), {"key": self.key, "unit": unit, "record": plain,
                                             "tensors": sorted(tensors)})

    def done(self) -> dict[int, Record]:
        """Unit id -> record, for every unit file this process can see."""
        out: dict[int, Record] = {}
        for f in sorted(self.root.glob("unit-*.json")) if self.root.is_dir() else []:
            try:
                d = json.loads(f.read_text())
                unit, record, names, key = int(d["unit"]), dict(d["record"]), list(d["tensors"]), d["key"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{f}: not a robustkit progress file ({e}); remove it or do not resume") \
                    from None
            if key != self.key:
                diff = [f"{k}: {key.get(k)!r} -> {self.key.get(k)!r}" for k in sorted(set(key) | set(self.key))
                        if key.get(k) != self.key.get(k)]
                raise InputError(f"resume: {f.parent} was made with different settings ({'; '.join(diff)}); "
                                 "use another output directory or the same settings")
            if names:
                from safetensors.torch import load_file

                try:
                    record.update(load_file(str(f.with_suffix(".safetensors"))))
                except Exception as e:  # noqa: BLE001 - any unreadable tensor file means the unit is redone
                    raise CheckpointError(f"{f.with_suffix('.safetensors')}: unreadable ({e}); remove "
                                          f"{f.name} to recompute that unit") from None
            out[unit] = record
        return out

    def clear(self) -> None:
        for f in self.root.glob("unit-*") if self.root.is_dir() else []:
            f.unlink(missing_ok=True)


def prepare(store: UnitStore | None, resume: bool) -> dict[int, Record]:
    """The units already done: with ``resume``, the union over the ranks of what each sees in
    ``store``; otherwise rank 0 clears ``store`` and nothing is done. A collective: every rank
    calls it at the same point."""
    if store is not None and not resume and world().is_main:
        store.clear()
    return union(store.done() if store is not None and resume else {})


def union(mine: dict[int, T]) -> dict[int, T]:
    """The union over the ranks of each rank's ``{id: record}`` (a record seen by several ranks,
    e.g. on a shared file system, travels once). A collective."""
    w = world()
    seen = all_gather(sorted(mine))                      # ids first, so each record travels once
    owner: dict[int, int] = {}
    for r, ids in enumerate(seen):
        for u in ids:
            owner.setdefault(u, r)
    shared = all_gather({u: rec for u, rec in mine.items() if owner[u] == w.rank})
    return {u: rec for part in shared for u, rec in part.items()}


def map_units(units: int | Sequence[int], compute: Callable[[int], Record], *, store: UnitStore | None = None,
              resume: bool = False, done: dict[int, Record] | None = None, progress: bool = True, desc: str = "",
              weight: Callable[[int], int] | None = None) -> list[Record]:
    """``[compute(u) for u in units]``, shared out over the torchrun ranks; every rank gets the list.

    units: unit ids (``n`` means ``0 .. n-1``), distinct. done: records already known (from
    ``prepare``); default ``prepare(store, resume)``. The units not done are dealt round-robin;
    each record is saved to ``store`` as soon as it is computed. Records may hold CPU tensors.
    weight(u): items in unit ``u``, for the progress bar (default 1).
    """
    ids = list(range(units)) if isinstance(units, int) else [int(u) for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("map_units: unit ids must be distinct (a bug in the caller)")
    done = prepare(store, resume) if done is None else done
    w = world()
    todo = [u for u in ids if u not in done]
    mine = todo[w.rank::w.size]
    size = weight or (lambda u: 1)
    bar = tqdm(total=sum(size(u) for u in mine), desc=desc + (f" [rank {w.rank}/{w.size}]" if w.distributed else ""),
               unit="img" if weight else "unit", disable=not (progress and w.is_main))
    fresh: dict[int, Record] = {}
    for u in mine:
        rec = compute(u)
        if store is not None:
            store.save(u, rec)
        fresh[u] = rec
        bar.update(size(u))
    bar.close()
    merged = dict(done)
    for part in all_gather(fresh):
        merged.update(part)
    return [merged[u] for u in ids]
