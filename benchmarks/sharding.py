"""Sharded certification under torchrun vs one process (JSON out).

Runs ``robustkit certify`` (randomized smoothing, the one certification pipeline) on the same
images three ways -- one process on 1 thread, one process on every core's worth of threads, and
``torchrun --nproc_per_node=P`` with 1 thread per process -- and records each run's wall-clock
(the whole command, start-up included, and the certification alone: results.json
``wall_seconds``) and whether the per-image results are identical (they must be: randomness is
per image). Target on a 2-core CPU box: ``P = 2`` at <= 0.6 x the 1-process wall-clock.

    python -m benchmarks.sharding [--quick] [--processes 2] [--n 10000] [--n-images 100]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Recipe, cached_model, log, parser, setup, write_results


def _run(argv: list[str], processes: int, threads: int) -> tuple[float, dict[str, Any]]:
    """Wall-clock of ``robustkit certify ARGV`` in ``processes`` processes and its results.json."""
    launch = [sys.executable, "-m", "robustkit"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "robustkit", "--"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run([*launch, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"robustkit certify failed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    out = Path(argv[argv.index("--out") + 1])
    return wall, json.loads((out / "results.json").read_text())


def _per_image(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in res["per_sample"]]


def main(argv: list[str] | None = None) -> int:
    p = parser("sharding", __doc__)
    p.add_argument("--processes", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--n", type=int, default=None, help="smoothing samples per image (default 10000, quick 2000)")
    p.add_argument("--n-images", type=int, default=None, help="test images (default 100, quick 24)")
    p.add_argument("--sigma", type=float, default=0.25)
    args = p.parse_args(argv)
    device = setup(args)
    n = args.n or (2000 if args.quick else 10_000)
    n_images = args.n_images or (24 if args.quick else 100)
    recipe = Recipe("noise-ibp-small-mnist5k", "ibp-small", epochs=1 if args.quick else 2, lr=1e-3, batch_size=128,
                    defense="noise", defense_params={"sigma": args.sigma}, seed=0)
    _, info = cached_model(recipe, device)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = ["certify", "--model", info["cache"], "--device", str(device), "--sigma", str(args.sigma),
                "--n0", "100", "--n", str(n), "--batch-size", "1000", "--n-images", str(n_images)]
        for name, procs, threads in (("1 process, 1 thread", 1, 1), (f"1 process, {cores} threads", 1, cores),
                                     (f"{args.processes} processes, 1 thread each", args.processes, 1)):
            wall, res = _run([*base, "--out", str(Path(tmp) / name.replace(" ", "_").replace(",", ""))], procs, threads)
            rows.append({"run": name, "processes": procs, "threads_per_process": threads, "wall_seconds": wall,
                         "certify_seconds": res["wall_seconds"], "per_image": _per_image(res),
                         "certified_accuracy_at_0": res["curve"]["certified_accuracy"][0],
                         "average_certified_radius": res["average_certified_radius"]})
            log("sharding", f"{name}: {wall:.1f} s (certification {res['wall_seconds']:.1f} s)")
    ref, ref_images = rows[0], rows[0]["per_image"]
    for r in rows:
        r["identical_to_1_process"] = r.pop("per_image") == ref_images
        r["wall_ratio_vs_1_process_1_thread"] = r["wall_seconds"] / ref["wall_seconds"]
        r["certify_ratio_vs_1_process_1_thread"] = r["certify_seconds"] / ref["certify_seconds"]
    sharded = rows[-1]
    body = {"settings": {"dataset": "mnist5k", "model": recipe.describe(), "sigma": args.sigma, "n0": 100, "n": n,
                         "n_images": n_images, "processes": args.processes, "cores": cores},
            "runs": rows, "target": f"{args.processes} processes <= 0.6 x the 1-process wall-clock, identical results",
            "meets_target": sharded["identical_to_1_process"] and sharded["wall_ratio_vs_1_process_1_thread"] <= 0.6}
    write_results(args.out, "sharding", body, device=device, args=args)
    log("sharding", f"{args.processes} processes: {sharded['wall_ratio_vs_1_process_1_thread']:.2f} x the wall-clock "
        f"of 1 process (certification alone {sharded['certify_ratio_vs_1_process_1_thread']:.2f} x); identical: "
        f"{sharded['identical_to_1_process']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
