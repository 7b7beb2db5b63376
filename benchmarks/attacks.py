"""Attack benchmark: speed and strength of robustkit's PGD and DeepFool vs peer libraries (JSON out).

On the same model, batch and settings, in one run:

1. PGD cost: time of PGD-k (``early_stop=False``) / (k x one forward+backward w.r.t. the
   input), the bare limit measured in the same run, rep by rep. Target <= 1.05 (a restart costs
   k+1 forwards and k backwards: the +1 forward judges the last iterate).
2. PGD-k vs torchattacks ``PGD``, foolbox ``LinfPGD`` and ART ``ProjectedGradientDescent``
   (same eps, step size, steps, random start): seconds, ratio vs the fastest peer, robust
   accuracy; ours with ``early_stop`` False and True.
3. DeepFool (L2) vs torchattacks ``DeepFool`` and foolbox ``L2DeepFool`` (50 steps, overshoot
   0.02, 10 candidates -- torchattacks has no candidates option and uses all classes):
   seconds, success rate, mean ||r||_2.
4. Peak memory per run (``benchmarks/_memory.py``; on CPU a rough lower bound).

Models: ``ibp-small`` trained one epoch on mnist5k (a few seconds, cached under
benchmarks/results/cache/), and the pretrained CIFAR-10 ResNet-18 of PyPI pyautoattack on a
seeded uniform-random [0, 1] 32x32 batch labelled with the model's own predictions (no CIFAR
data offline). torchattacks, foolbox and ART are peers, never part of our implementation.

    python -m benchmarks.attacks [--quick] [--device auto] [--amp] [--channels-last] [--timer cpu]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from attacks import PGD, DeepFool
from benchmarks._common import fwd_bwd, log, parser, ratios_vs_fastest_peer, setup, timed, write_results
from benchmarks._memory import PeakMemory
from benchmarks._models import cifar_resnet18, small_cnn
from benchmarks._peers import DF_PEERS, PGD_PEERS, peer_deepfool, peer_pgd
from robustkit.data import make_loader

PEER_PACKAGES = ("torchattacks", "foolbox", "adversarial-robustness-toolbox", "pyautoattack")
CLOCK: Callable[[], float] = time.perf_counter   # --timer cpu: time.process_time (shared CPU machines)


def measure(fn: Callable[[], Any], reps: int, device: torch.device) -> tuple[float, float, Any]:
    """``(median seconds over reps, peak MiB of the warm-up run, last output)``: one warm-up run
    under the memory probe, then ``reps`` timed runs."""
    with PeakMemory(device) as mem:
        out = fn()
    times = []
    for _ in range(reps):
        t, out = timed(fn, device, CLOCK)
        times.append(t)
    return statistics.median(times), mem.peak_mib, out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x.to(y.device)).argmax(1) == y).float().mean().item()


def _try(rows: list[dict[str, Any]], row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - a broken peer must not sink the benchmark
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    _log(row)
    rows.append(row)


def _log(row: dict[str, Any]) -> None:
    log("attacks", f"  {row['impl']:<55} {row.get('seconds', float('nan')):8.3f}s")


def pgd_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pgd: Callable[[], Any], k: int,
             reps: int) -> dict[str, Any]:
    """PGD-k (early_stop=False) time / time of k back-to-back forward+backward passes w.r.t. the
    input, measured interleaved (rep by rep) so load drift on a shared machine hits both alike."""
    dev = x.device
    t_pgd, t_k = [], []
    for _ in range(reps):
        t_pgd.append(timed(pgd, dev, CLOCK)[0])
        t_k.append(timed(lambda: [fwd_bwd(model, x, y) for _ in range(k)], dev, CLOCK)[0])
    pgd_s, k_s = statistics.median(t_pgd), statistics.median(t_k)
    return {"k": k, "pgd_seconds": pgd_s, "k_fwd_bwd_seconds": k_s, "ratio_vs_k_fwd_bwd": pgd_s / k_s,
            "target": 1.05, "reps": reps, "passes": f"{k + 1} forwards + {k} backwards per sample"}


def bench_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, reps: int,
              amp: bool, channels_last: bool) -> dict[str, Any]:
    dev, alpha = x.device, 2.5 * eps / steps

    def ours(early_stop: bool) -> Callable[[], Any]:
        atk = PGD(norm="linf", eps=eps, steps=steps, step_size=alpha, early_stop=early_stop, seed=0, amp=amp,
                  channels_last=channels_last)
        return lambda: atk(model, x, y)

    rows: list[dict[str, Any]] = []
    for es in (False, True):
        t, mem, res = measure(ours(es), reps, dev)
        rows.append({"impl": f"robustkit PGD (early_stop={es})", "peer": False, "seconds": t, "peak_mem_mib": mem,
                     "robust_accuracy": accuracy(model, res.x_adv, y), "forward_passes": res.info.get("forward_passes"),
                     "backward_passes": res.info.get("backward_passes")})
        _log(rows[-1])
    cost = pgd_cost(model, x, y, ours(False), steps, max(reps, 3))
    for lib, label in PGD_PEERS.items():
        def run_peer(lib: str = lib) -> dict[str, Any]:
            torch.manual_seed(0)
            t, mem, xa = measure(peer_pgd(lib, model, x, y, eps, alpha, steps), reps, dev)
            return {"seconds": t, "peak_mem_mib": mem, "robust_accuracy": accuracy(model, xa, y)}
        _try(rows, {"impl": label, "peer": True}, run_peer)
    return {"step_size": alpha, "pgd_cost": cost, "pgd_vs_peers": {"rows": rows,
                                                                   "fastest_peer": ratios_vs_fastest_peer(rows)}}


def bench_deepfool(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, Any]:
    dev, rows = x.device, []
    t, mem, res = measure(lambda: DeepFool(norm="l2", candidates=10, overshoot=0.02, max_iter=50)(model, x, y),
                          reps, dev)
    rows.append({"impl": "robustkit DeepFool (l2)", "peer": False, "seconds": t, "peak_mem_mib": mem,
                 "success_rate": res.success.float().mean().item(), "mean_l2": res.info["l2"].mean().item()})
    _log(rows[-1])
    for lib, label in DF_PEERS.items():
        def run_df(lib: str = lib) -> dict[str, Any]:
            t, mem, xa = measure(peer_deepfool(lib, model, x, y, 50, 0.02, 10), reps, dev)
            with torch.no_grad():
                ok = model(xa).argmax(1) != y
            return {"seconds": t, "peak_mem_mib": mem, "success_rate": ok.float().mean().item(),
                    "mean_l2": (xa - x).flatten(1).norm(dim=1).mean().item()}
        _try(rows, {"impl": label, "peer": True}, run_df)
    return {"batch": int(x.shape[0]), "steps": 50, "overshoot": 0.02, "candidates": 10, "rows": rows,
            "fastest_peer": ratios_vs_fastest_peer(rows)}


def bench_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                df_n: int, reps: int, amp: bool, channels_last: bool) -> dict[str, Any]:
    dev = x.device
    with PeakMemory(dev) as mem:
        fwd_bwd(model, x, y)
    t_fb = statistics.median(timed(lambda: fwd_bwd(model, x, y), dev, CLOCK)[0] for _ in range(max(reps, 3)))
    out: dict[str, Any] = {"batch": int(x.shape[0]), "eps": eps, "steps": steps,
                           "clean_accuracy": accuracy(model, x, y), "fwd_bwd_seconds": t_fb,
                           "fwd_bwd_peak_mem_mib": mem.peak_mib}
    out.update(bench_pgd(model, x, y, eps, steps, reps, amp, channels_last))
    out["deepfool_vs_peers"] = bench_deepfool(model, x[:df_n], y[:df_n], reps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("attacks", __doc__)
    p.add_argument("--amp", action="store_true", help="autocast for our attacks (CUDA only; peers stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (all impls)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 1 quick, 3 otherwise)")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock (default) or process CPU time (robust to other load on a shared CPU machine; "
                        "CPU device only)")
    args = p.parse_args(argv)
    dev = setup(args)
    global CLOCK
    if args.timer == "cpu":
        if dev.type != "cpu":
            p.error("--timer cpu only makes sense with --device cpu")
        CLOCK = time.process_time
    reps = args.reps or (1 if args.quick else 3)
    body: dict[str, Any] = {"amp": args.amp, "channels_last": args.channels_last, "reps": reps,
                            "timer": "process CPU time" if args.timer == "cpu" else "wall clock", "models": {},
                            "notes": ["times are medians of the timed repetitions after one warm-up run",
                                      "robust accuracy is over the whole batch (clean errors count as broken)",
                                      "CPU peak memory = RSS growth during the warm-up run (rough lower bound)",
                                      "amp applies to robustkit attacks only; peers run in fp32",
                                      "the CIFAR-10 ResNet-18 runs on seeded uniform-random [0,1] inputs labelled "
                                      "with its own predictions (no CIFAR-10 data offline): speed is meaningful, "
                                      "robust accuracy is not a CIFAR-10 number"]}
    torch.manual_seed(0)
    small, info = small_cnn(dev)
    n_small = 128 if args.quick else 500
    xs, ys = next(iter(make_loader("mnist5k", "test", batch_size=n_small, shuffle=True, seed=0, device=dev)))
    resnet, rinfo = cifar_resnet18(dev)
    n_res = 8 if args.quick else 32
    xr = torch.rand(n_res, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        yr = resnet(xr).argmax(1)
    plan = [("ibp-small/mnist5k", small, info, xs, ys, 0.1, 10 if args.quick else 20, 16 if args.quick else 200),
            ("pyautoattack-resnet18/cifar10-shaped-random", resnet, rinfo, xr, yr, 1 / 255, 5 if args.quick else 10,
             4 if args.quick else 16)]
    for name, model, minfo, x, y, eps, steps, df_n in plan:
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        log("attacks", f"{name}: batch {x.shape[0]}, PGD-{steps}, DeepFool on {df_n}")
        body["models"][name] = {"model": minfo, **bench_model(model, x, y, eps, steps, df_n, reps, args.amp,
                                                              args.channels_last)}
    write_results(args.out, "attacks", body, device=dev, args=args, packages=PEER_PACKAGES)
    for name, r in body["models"].items():
        log("attacks", f"{name}: PGD cost ratio {r['pgd_cost']['ratio_vs_k_fwd_bwd']:.3f} (target <= 1.05)")
        for row in r["pgd_vs_peers"]["rows"] + r["deepfool_vs_peers"]["rows"]:
            log("attacks", f"  {row['impl']:<55} {row.get('seconds', float('nan')):8.3f}s  "
                f"x{row.get('ratio_vs_fastest_peer', float('nan')):.2f}  "
                + (f"robust {row['robust_accuracy']:.3f}" if "robust_accuracy" in row else
                   f"l2 {row.get('mean_l2', float('nan')):.3f}") + (f"  {row['error']}" if "error" in row else ""))
    log("attacks", f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
