"""What the benchmark modules share: arguments, timing, cached trained models, results JSON.

- ``parser`` / ``setup``: every module takes ``--quick``, ``--out``, ``--threads`` and (where the
  benchmark can run on a GPU) ``--device``.
- Timing: ``median_seconds`` (warm-up runs, then the median of timed repeats) and
  ``interleaved_seconds`` (several functions timed rep by rep, so load drift on a shared machine
  hits all of them alike); both call ``torch.cuda.synchronize`` around each run on CUDA.
  ``fwd_bwd`` is one forward + backward w.r.t. the input, the unit of attack cost ("the bare limit").
- ``cached_model``: a model trained once through the project's ``Trainer`` from a ``Recipe`` and
  cached under ``benchmarks/results/cache/`` (``ROBUSTKIT_BENCH_CACHE`` overrides), keyed by the
  recipe; the metadata file is written last, so an interrupted training is redone, never half-loaded.
- ``write_results``: one JSON file, written atomically, with the machine (CPU model, cores, torch
  threads, GPU, torch and peer versions) and every option the run used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from defenses.base import Defense
from defenses.schedules import make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit.data import make_loader
from robustkit.device import resolve_device, seed_everything
from robustkit.io import atomic_write_json
from robustkit.registry import DEFENSES
from robustkit.validate import integer
from robustkit.zoo import RobustModel, create, load, save

RESULTS = Path(__file__).resolve().parent / "results"
Clock = Callable[[], float]


# -- arguments -------------------------------------------------------------------------------------
def parser(name: str, doc: str | None, *, device: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark shares; ``name`` is the module (``benchmarks.<name>``)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small settings: every benchmark with --quick together takes a few minutes on 2 CPU cores")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="results JSON (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    if device:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``; return the device of ``--device`` (CPU for CPU-only benchmarks)."""
    if args.threads is not None:
        torch.set_num_threads(integer("--threads", args.threads, minimum=1))
    return resolve_device(getattr(args, "device", "cpu"))


def in_workdir(runs: str | None, prefix: str, fn: Callable[[Path], int]) -> int:
    """``fn(work)`` in ``runs`` when given (kept, so a rerun reuses what is there), else in a temp dir."""
    if runs:
        return fn(Path(runs))
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        return fn(Path(work))


# -- timing ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, clock: Clock = time.perf_counter) -> tuple[float, Any]:
    """``(seconds, output)`` of one call of ``fn``, synchronized on CUDA."""
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return clock() - t0, out


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1,
                   clock: Clock = time.perf_counter) -> float:
    """Median over ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device, clock)[0] for _ in range(max(repeats, 1)))


def interleaved_seconds(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1,
                        clock: Clock = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, timed rep by rep (a, b, a, b, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(repeats, 1)):
        for k, fn in fns.items():
            times[k].append(timed(fn, device, clock)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward + backward w.r.t. the input (no parameter gradients): the unit of attack cost."""
    xg = x.detach().requires_grad_(True)                      # (B, C, H, W)
    loss = F.cross_entropy(model(xg), y, reduction="sum")
    return torch.autograd.grad(loss, xg)[0]


def ratios_vs_fastest_peer(rows: list[dict[str, Any]], key: str = "seconds") -> str | None:
    """Add ``ratio_vs_fastest_peer`` (``row[key] / fastest peer's``) to every timed row; return the
    fastest peer's ``impl`` (rows with ``peer=True`` are peers; rows without ``key`` failed)."""
    peers = [r for r in rows if r.get("peer") and r.get(key)]
    if not peers:
        return None
    fastest = min(peers, key=lambda r: r[key])
    for r in rows:
        if r.get(key):
            r["ratio_vs_fastest_peer"] = r[key] / fastest[key]
    return fastest["impl"]


# -- machine and results ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages: Iterable[str] = ()) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine_info(device: torch.device, packages: Iterable[str] = ()) -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, torch threads, GPU, library versions."""
    info: dict[str, Any] = {"device": str(device), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "python": platform.python_version(), "versions": versions(packages)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(path: str | Path, benchmark: str, body: Mapping[str, Any], *, args: argparse.Namespace,
                  device: torch.device, packages: Iterable[str] = ()) -> Path:
    """Write ``{"benchmark", "date", "quick", "command", "args", "machine", **body}`` atomically to ``path``
    (``args``: every option as parsed, defaults included)."""
    res = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": bool(args.quick),
           "command": f"python -m benchmarks.{benchmark}", "args": vars(args),
           "machine": machine_info(device, packages), **body}
    return atomic_write_json(path, res)


def log(benchmark: str, msg: str) -> None:
    print(f"[{benchmark}] {msg}", file=sys.stderr, flush=True)


# -- cached models ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How a benchmark model is trained (the cache key). ``defense`` names a ``DEFENSES`` entry built
    with ``defense_params``, or describes the objective a caller passes to ``cached_model``."""

    name: str                          # cache folder prefix, e.g. "ibp-small-mnist5k"
    arch: str
    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adam"
    weight_decay: float = 0.0
    defense: str = "standard"
    defense_params: dict[str, Any] = field(default_factory=dict)
    schedule: str = "constant"
    schedule_params: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist5k"
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_train: int | None = None
    seed: int = 0
    grad_clip: float | None = None

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))      # tuples -> lists, as in the JSON

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("ROBUSTKIT_BENCH_CACHE") or RESULTS / "cache")


def cached_model(recipe: Recipe, device: torch.device, defense: Callable[[], Defense] | None = None,
                 retrain: bool = False) -> tuple[RobustModel, dict[str, Any]]:
    """``(model in eval mode on device, info)``: trained with ``Trainer`` on ``recipe.dataset``/train, or
    loaded from the cache (``retrain``: train again and replace it). ``defense`` builds a custom
    objective (``recipe.defense`` then describes it)."""
    folder = cache_root() / f"{recipe.name}-{recipe.key()}"
    meta_file = folder / "bench_meta.json"
    if meta_file.is_file() and not retrain:
        meta = json.loads(meta_file.read_text())
        if meta.get("recipe") == recipe.describe():
            return load(folder, map_location=device).eval(), {**meta, "cached": True, "cache": str(folder)}
    seed_everything(recipe.seed)
    model = create(recipe.arch, num_classes=recipe.num_classes, input_shape=recipe.input_shape).to(device)
    objective = defense() if defense is not None else DEFENSES.get(recipe.defense)(**recipe.defense_params)
    loader = make_loader(recipe.dataset, "train", batch_size=recipe.batch_size, n=recipe.n_train, seed=recipe.seed,
                         device=device)
    opt = make_optimizer(model.parameters(), recipe.optimizer, recipe.lr, weight_decay=recipe.weight_decay)
    t0 = time.perf_counter()
    history = Trainer(model, objective, loader, epochs=recipe.epochs, optimizer=opt,
                      schedule=make_schedule(recipe.schedule, **recipe.schedule_params), grad_clip=recipe.grad_clip,
                      progress=False).fit()
    meta = {"recipe": recipe.describe(), "train_seconds": time.perf_counter() - t0, "trained_on": str(device),
            "steps": recipe.epochs * len(loader), "train_images": len(loader.data),
            "objective": objective.params(),
            "final_train": {k: v for k, v in history[-1].items() if k.startswith("train_")}}
    save(model, folder)
    atomic_write_json(meta_file, meta)                        # last: a model without it is retrained
    return model.eval(), {**meta, "cached": False, "cache": str(folder)}
