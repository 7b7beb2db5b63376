"""Attack benchmark: speed and strength of robustkit's PGD and DeepFool vs peer libraries (JSON out).

On the same model, batch and settings, in one run:

1. PGD cost: time of PGD-k (``early_stop=False``) / (k x one forward+backward w.r.t. the
   input). Target <= 1.05 (a restart costs k+1 forwards and k backwards: the +1 forward
   judges the last iterate).
2. PGD-k vs torchattacks ``PGD``, foolbox ``LinfPGD`` and ART ``ProjectedGradientDescent``
   (same eps, step size, steps, random start): seconds, ratio vs the fastest peer, robust
   accuracy; ours with ``early_stop`` False and True.
3. DeepFool (L2) vs torchattacks ``DeepFool`` and foolbox ``L2DeepFool`` (50 steps, overshoot
   0.02, 10 candidates -- torchattacks has no candidates option and uses all classes):
   seconds, success rate, mean ||r||_2.
4. Peak memory per run: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident
   set size above the level before the run (after ``malloc_trim``), sampled every 2 ms from
   /proc/self/statm (tracemalloc does not see torch's allocator). The CPU number is a rough
   lower bound: memory the allocator kept from earlier runs is not counted again.

Models: ``ibp-small`` trained one epoch on mnist5k (a few seconds, cached under
benchmarks/results/cache/), and the pretrained CIFAR-10 ResNet-18 of PyPI pyautoattack on a
seeded uniform-random [0, 1] 32x32 batch labelled with the model's own predictions (no CIFAR
data offline). torchattacks, foolbox and ART are peers, never part of our implementation.

    python benchmarks/attacks.py [--quick] [--device auto] [--amp] [--channels-last] \
        [--out benchmarks/results/attacks.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attacks.deepfool import DeepFool  # noqa: E402
from attacks.pgd import PGD  # noqa: E402
from benchmarks._models import cifar_resnet18, small_cnn  # noqa: E402
from robustkit.data import make_loader  # noqa: E402
from robustkit.device import resolve_device  # noqa: E402
from robustkit.io import atomic_write_json  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK: Callable[[], float] = time.perf_counter   # --timer cpu: time.process_time (shared CPU machines)


# -- measuring -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # not Linux
        return 0


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc) so that RSS growth reflects the next run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the enclosed code in MiB (see the module docstring for the method)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = self._peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (max(self._peak, _rss()) - self._base) / 2**20


def measure(fn: Callable[[], Any], reps: int, device: torch.device) -> tuple[float, float, Any]:
    """``(median seconds over reps, peak MiB of the warm-up run, last output)``: one warm-up run
    under the memory probe, then ``reps`` timed runs."""
    with PeakMemory(device) as mem:
        out = fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = CLOCK()
        out = fn()
        _sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times), mem.peak_mib, out


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward + backward w.r.t. the input (no parameter grads): the unit of attack cost."""
    xg = x.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
    return torch.autograd.grad(loss, xg)[0]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x.to(y.device)).argmax(1) == y).float().mean().item()


# -- peers ---------------------------------------------------------------------------------------
def peer_pgd(lib: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
             steps: int) -> Callable[[], torch.Tensor]:
    if lib == "torchattacks":
        import torchattacks

        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        return lambda: atk(x, y)
    if lib == "foolbox":
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        fatk = fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True)
        return lambda: fatk(fmodel, x, y, epsilons=eps)[1]
    if lib == "art":
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=int(model.num_classes), clip_values=(0.0, 1.0),
                                device_type="gpu" if x.device.type == "cuda" else "cpu")
        aatk = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                        num_random_init=1, batch_size=x.shape[0], verbose=False)
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        return lambda: torch.from_numpy(aatk.generate(x=xn, y=yn)).to(x.device)
    raise ValueError(lib)


def peer_deepfool(lib: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                  overshoot: float, candidates: int) -> Callable[[], torch.Tensor]:
    if lib == "torchattacks":
        import torchattacks

        atk = torchattacks.DeepFool(model, steps=steps, overshoot=overshoot)
        return lambda: atk(x, y)
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    fatk = fb.attacks.L2DeepFoolAttack(steps=steps, candidates=candidates, overshoot=overshoot)
    return lambda: fatk(fmodel, x, y, epsilons=None)[0]


PGD_PEERS = {"torchattacks": "torchattacks.PGD", "foolbox": "foolbox.attacks.LinfPGD",
             "art": "art ProjectedGradientDescent (PyTorchClassifier)"}
DF_PEERS = {"torchattacks": "torchattacks.DeepFool (all classes, per-sample loop)",
            "foolbox": "foolbox.attacks.L2DeepFoolAttack"}


def _ratios(rows: list[dict[str, Any]]) -> str | None:
    peers = [r for r in rows if r.get("peer") and r.get("seconds")]
    if not peers:
        return None
    fastest = min(peers, key=lambda r: r["seconds"])
    for r in rows:
        if r.get("seconds"):
            r["ratio_vs_fastest_peer"] = r["seconds"] / fastest["seconds"]
    return fastest["impl"]


def _try(rows: list[dict[str, Any]], row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - a broken peer must not sink the benchmark
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    _log(row)
    rows.append(row)


def _log(row: dict[str, Any]) -> None:
    print(f"[attacks]   {row['impl']:<55} {row.get('seconds', float('nan')):8.3f}s", file=sys.stderr, flush=True)


def pgd_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pgd: Callable[[], Any], k: int,
             reps: int) -> dict[str, Any]:
    """PGD-k (early_stop=False) time / time of k back-to-back forward+backward passes w.r.t. the
    input, measured interleaved (rep by rep) so load drift on a shared machine hits both alike."""
    dev = x.device
    t_pgd, t_k = [], []
    for _ in range(reps):
        for fn, acc in ((pgd, t_pgd), (lambda: [fwd_bwd(model, x, y) for _ in range(k)], t_k)):
            _sync(dev)
            t0 = CLOCK()
            fn()
            _sync(dev)
            acc.append(CLOCK() - t0)
    pgd_s, k_s = statistics.median(t_pgd), statistics.median(t_k)
    return {"k": k, "pgd_seconds": pgd_s, "k_fwd_bwd_seconds": k_s, "ratio_vs_k_fwd_bwd": pgd_s / k_s,
            "target": 1.05, "reps": reps, "passes": f"{k + 1} forwards + {k} backwards per sample"}


# -- one model -----------------------------------------------------------------------------------
def bench_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                df_n: int, reps: int, amp: bool, channels_last: bool) -> dict[str, Any]:
    dev = x.device
    alpha = 2.5 * eps / steps
    t_fb, mem_fb, _ = measure(lambda: fwd_bwd(model, x, y), max(reps, 3), dev)
    out: dict[str, Any] = {"batch": int(x.shape[0]), "eps": eps, "steps": steps, "step_size": alpha,
                           "clean_accuracy": accuracy(model, x, y), "fwd_bwd_seconds": t_fb,
                           "fwd_bwd_peak_mem_mib": mem_fb}

    def ours(early_stop: bool) -> Callable[[], Any]:
        atk = PGD(norm="linf", eps=eps, steps=steps, step_size=alpha, early_stop=early_stop, seed=0, amp=amp,
                  channels_last=channels_last)
        return lambda: atk(model, x, y)

    rows: list[dict[str, Any]] = []
    for es in (False, True):
        t, mem, res = measure(ours(es), reps, dev)
        rows.append({"impl": f"robustkit PGD (early_stop={es})", "peer": False, "seconds": t, "peak_mem_mib": mem,
                     "robust_accuracy": accuracy(model, res.x_adv, y), "forward_passes": res.info["forward_passes"],
                     "backward_passes": res.info["backward_passes"]})
        _log(rows[-1])
    out["pgd_cost"] = pgd_cost(model, x, y, ours(False), steps, max(reps, 3))
    for lib, label in PGD_PEERS.items():
        def run_peer(lib: str = lib) -> dict[str, Any]:
            torch.manual_seed(0)
            t, mem, xa = measure(peer_pgd(lib, model, x, y, eps, alpha, steps), reps, dev)
            return {"seconds": t, "peak_mem_mib": mem, "robust_accuracy": accuracy(model, xa, y)}
        _try(rows, {"impl": label, "peer": True}, run_peer)
    out["pgd_vs_peers"] = {"rows": rows, "fastest_peer": _ratios(rows)}

    xd, yd = x[:df_n], y[:df_n]
    df_rows: list[dict[str, Any]] = []
    t, mem, res = measure(lambda: DeepFool(norm="l2", candidates=10, overshoot=0.02, max_iter=50)(model, xd, yd),
                          reps, dev)
    df_rows.append({"impl": "robustkit DeepFool (l2)", "peer": False, "seconds": t, "peak_mem_mib": mem,
                    "success_rate": res.success.float().mean().item(), "mean_l2": res.info["l2"].mean().item()})
    _log(df_rows[-1])
    for lib, label in DF_PEERS.items():
        def run_df(lib: str = lib) -> dict[str, Any]:
            t, mem, xa = measure(peer_deepfool(lib, model, xd, yd, 50, 0.02, 10), reps, dev)
            with torch.no_grad():
                ok = model(xa).argmax(1) != yd
            return {"seconds": t, "peak_mem_mib": mem, "success_rate": ok.float().mean().item(),
                    "mean_l2": (xa - xd).flatten(1).norm(dim=1).mean().item()}
        _try(df_rows, {"impl": label, "peer": True}, run_df)
    out["deepfool_vs_peers"] = {"batch": int(xd.shape[0]), "steps": 50, "overshoot": 0.02, "candidates": 10,
                                "rows": df_rows, "fastest_peer": _ratios(df_rows)}
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("torchattacks", "foolbox", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="autocast for our attacks (CUDA only; peers stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (all impls)")
    p.add_argument("--quick", action="store_true", help="small batches, few steps, one timed repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 1 quick, 3 otherwise)")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock (default) or process CPU time (robust to other load on a shared CPU machine; "
                        "CPU device only)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attacks.json"))
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    global CLOCK
    if args.timer == "cpu":
        if dev.type != "cpu":
            raise SystemExit("--timer cpu only makes sense with --device cpu")
        CLOCK = time.process_time
    reps = args.reps or (1 if args.quick else 3)
    cache = ROOT / "benchmarks" / "results" / "cache" / "ibp-small-mnist5k"
    res: dict[str, Any] = {"benchmark": "attacks", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "platform": platform.platform(), "python": platform.python_version(),
                           "device": str(dev), "threads": torch.get_num_threads(), "quick": args.quick,
                           "amp": args.amp, "channels_last": args.channels_last, "reps": reps,
                           "timer": "process CPU time" if args.timer == "cpu" else "wall clock",
                           "versions": _versions(), "models": {},
                           "notes": ["times are medians of the timed repetitions after one warm-up run",
                                     "robust accuracy is over the whole batch (clean errors count as broken)",
                                     "CPU peak memory = RSS growth during the warm-up run (rough lower bound)",
                                     "amp applies to robustkit attacks only; peers run in fp32",
                                     "the CIFAR-10 ResNet-18 runs on seeded uniform-random [0,1] inputs labelled "
                                     "with its own predictions (no CIFAR-10 data offline): speed is meaningful, "
                                     "robust accuracy is not a CIFAR-10 number"]}
    torch.manual_seed(0)
    small, info = small_cnn(cache, dev)
    n_small = 128 if args.quick else 500
    xs, ys = next(iter(make_loader("mnist5k", "test", batch_size=n_small, shuffle=True, seed=0, device=dev)))
    g = torch.Generator().manual_seed(0)
    resnet, rinfo = cifar_resnet18(dev)
    n_res = 8 if args.quick else 32
    xr = torch.rand(n_res, 3, 32, 32, generator=g).to(dev)
    with torch.no_grad():
        yr = resnet(xr).argmax(1)
    plan = [("ibp-small/mnist5k", small, info, xs, ys, 0.1, 10 if args.quick else 20, 64 if args.quick else 200),
            ("pyautoattack-resnet18/cifar10-shaped-random", resnet, rinfo, xr, yr, 1 / 255, 5 if args.quick else 10,
             4 if args.quick else 16)]
    for name, model, minfo, x, y, eps, steps, df_n in plan:
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        print(f"[attacks] {name}: batch {x.shape[0]}, PGD-{steps}, DeepFool on {df_n}", file=sys.stderr)
        res["models"][name] = {"model": minfo, **bench_model(model, x, y, eps, steps, df_n, reps, args.amp,
                                                             args.channels_last)}
    atomic_write_json(args.out, res)
    for name, r in res["models"].items():
        print(f"{name}: PGD cost ratio {r['pgd_cost']['ratio_vs_k_fwd_bwd']:.3f} (target <= 1.05)", file=sys.stderr)
        for row in r["pgd_vs_peers"]["rows"] + r["deepfool_vs_peers"]["rows"]:
            print(f"  {row['impl']:<55} {row.get('seconds', float('nan')):8.3f}s  "
                  f"x{row.get('ratio_vs_fastest_peer', float('nan')):.2f}  "
                  + (f"robust {row['robust_accuracy']:.3f}" if "robust_accuracy" in row else
                     f"l2 {row.get('mean_l2', float('nan')):.3f}") + (f"  {row['error']}" if "error" in row else ""),
                  file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
