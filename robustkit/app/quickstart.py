"""The main job on the embedded mnist5k data, end to end:

1. ``standard``   standard training of the IBP small CNN (the "pretrained" model);
2. ``finetune``   adversarial fine-tuning of it with TRADES + AWP and the slow-start-fast-decay
                  schedule (Jeddi et al. 2020);
3. ``noise``      Gaussian-noise training (the base classifier of randomized smoothing);
4. ``ibp``        IBP certified training (Gowal et al. 2018);
5. ``certify``    smoothing radii of the noise model, IBP radii of the IBP model;
6. ``benchmark``  clean / AutoAttack / PGD / fast-ensemble accuracy of all four models;
7. ``report.md``  one page with the leaderboard, certified-accuracy curves and training curves.

Every stage writes into its own directory under ``out`` and is skipped when its results
exist, so an interrupted quickstart resumes where it stopped. ``full=True`` uses bigger
settings (more epochs, more images, more smoothing samples).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustkit.config import TrainConfig, from_dict
from robustkit.data import load_data
from robustkit.io import atomic_write_json
from robustkit.report import md_table, write_markdown
from robustkit.zoo import load


@dataclass(frozen=True)
class Settings:
    arch: str = "ibp-small"
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    trades_steps: int = 20
    noise_epochs: int = 10
    sigma: float = 0.25
    ibp_epochs: int = 20
    ibp_eps: float = 0.1
    eps: float = 0.1                      # L-inf threat model of fine-tuning, IBP and the benchmark
    eval_n: int = 500                     # per-epoch held-out slice
    smoothing_images: int = 100
    smoothing_n0: int = 100
    smoothing_n: int = 10_000
    alpha: float = 0.001
    bench_n: int = 500                    # AutoAttack subset (first n test images, a shuffled split)
    ibp_images: int = 1000
    attack_params: dict[str, dict[str, Any]] | None = None  # per-attack overrides for the benchmark (tests)

    @classmethod
    def make(cls, full: bool) -> Settings:
        if not full:
            return cls()
        return cls(pretrain_epochs=20, finetune_epochs=10, trades_steps=40, noise_epochs=30, ibp_epochs=60,
                   smoothing_images=500, smoothing_n=100_000, bench_n=1000)


def _train_cfg(s: Settings, epochs: int, **sections: dict[str, Any]) -> TrainConfig:
    """A stage's ``TrainConfig``: the shared base (``s.arch`` on mnist5k, per-epoch 10-step PGD at
    ``s.eps`` on the first ``s.eval_n`` test images) with the stage's own keys per section."""
    data: dict[str, Any] = {"epochs": epochs, **sections}
    data["model"] = {"arch": s.arch, **sections.get("model", {})}
    data["data"] = {"name": "mnist5k", **sections.get("data", {})}
    data["eval"] = {"n": s.eval_n, "attack": "pgd", "eps": str(s.eps), "steps": 10, **sections.get("eval", {})}
    return from_dict(TrainConfig, data)


def stage_configs(s: Settings, out: Path) -> dict[str, TrainConfig]:
    """The four training stages: standard (the "pretrained" model), its TRADES + AWP fine-tuning,
    Gaussian-noise training (for smoothing) and IBP training."""
    return {
        "standard": _train_cfg(s, s.pretrain_epochs, optim={"lr": 0.05}, defense={"name": "standard"},
                               eval={"best_by": "clean_accuracy"}),
        "finetune": _train_cfg(
            s, s.finetune_epochs, model={"pretrained": str(out / "standard")}, optim={"lr": 0.05},
            schedule={"name": "slow-start-fast-decay"},
            defense={"name": "trades", "params": {"preset": "mnist", "eps": s.eps, "steps": s.trades_steps,
                                                  "step_size": 2 * s.eps / s.trades_steps},
                     "weight_perturbation": "awp", "wp_params": {"gamma": 5e-3, "warmup_epochs": 0}}),
        "noise": _train_cfg(s, s.noise_epochs, optim={"lr": 0.05}, defense={"name": "noise",
                                                                            "params": {"sigma": s.sigma}},
                            eval={"best_by": "clean_accuracy"}),
        "ibp": _train_cfg(s, s.ibp_epochs, optim={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                          schedule={"name": "step", "milestones": [0.6, 0.85]},
                          defense={"name": "ibp", "params": {"eps": s.ibp_eps}}),
    }


def _done(d: Path) -> bool:
    return (d / "results.json").is_file()


def run_quickstart(out: str | Path, device: torch.device, full: bool = False, progress: bool = True,
                   log: Callable[[str], None] = lambda m: None, settings: Settings | None = None) -> Path:
    """Run (or resume) every stage; returns the path of the combined ``report.md``.
    ``settings`` overrides the default / ``full`` settings (the tests use tiny ones)."""
    from robustkit.app.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings or Settings.make(full)
    atomic_write_json(out / "settings.json", asdict(s))
    timings: dict[str, float] = _load_json(out / "timings.json")
    for name, cfg in stage_configs(s, out).items():
        d = out / name
        if _done(d):
            log(f"[{name}] done already: {d}")
            continue
        log(f"[{name}] training {cfg.model.arch} with {cfg.defense.name}"
            f"{' + ' + cfg.defense.weight_perturbation if cfg.defense.weight_perturbation else ''}, "
            f"{cfg.epochs} epochs -> {d}")
        t0 = time.perf_counter()
        resume = (d / "checkpoints").exists()
        train(cfg, d, device, resume=resume, progress=progress)
        timings[name] = timings.get(name, 0.0) * resume + time.perf_counter() - t0
        atomic_write_json(out / "timings.json", timings)
    if not _done(out / "certify"):
        log("[certify] smoothing radii (noise model), IBP radii (ibp model)")
        t0 = time.perf_counter()
        certify_stage(out, s, device, progress)
        timings["certify"] = time.perf_counter() - t0
        atomic_write_json(out / "timings.json", timings)
    if not _done(out / "benchmark"):
        log(f"[benchmark] AutoAttack, PGD and the fast ensemble on the first {s.bench_n} test images")
        t0 = time.perf_counter()
        benchmark_stage(out, s, device)
        timings["benchmark"] = time.perf_counter() - t0
        atomic_write_json(out / "timings.json", timings)
    return write_report(out, s, timings)


def _load_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text()) if p.is_file() else {}


def certify_stage(out: Path, s: Settings, device: torch.device, progress: bool) -> None:
    """Smoothing radii (L2) of the noise model; IBP radii (L-inf) of the IBP model and, for contrast,
    of the standard one -- on the one certification pipeline (``robustkit.app.certify``), seed 0
    (the CLI's and the benchmark's default), each run resumable under ``out/certify/<run>``."""
    from certify.ibp import IBPCertifier
    from certify.smoothing import SmoothingCertifier
    from robustkit.app._certify_report import plot_curves, write_outputs
    from robustkit.app.certify import Points, certify_points

    test = load_data("mnist5k", "test")
    d = out / "certify"
    smoothing = SmoothingCertifier(sigma=s.sigma, n0=s.smoothing_n0, n=s.smoothing_n, alpha=s.alpha)
    ibp = IBPCertifier(eps=s.ibp_eps)                     # the one default bisection: tol 1e-3 on [0, 1]
    runs = {"smoothing-noise": ("noise", smoothing, s.smoothing_images),
            "ibp-ibp": ("ibp", ibp, s.ibp_images), "ibp-standard": ("standard", ibp, s.ibp_images)}
    done: dict[str, dict[str, Any]] = {}
    for run, (name, certifier, n) in runs.items():
        model = load(out / name, map_location=device)
        points = Points.first(*test.tensors(n), "mnist5k")
        done[run] = certify_points(model, points, certifier, seed=0, resume=True, out=d / run, progress=progress)
        write_outputs(d / run, done[run], model=str(out / name))
    plot_curves(d / "plots" / "smoothing_certified_accuracy.png", {f"noise model, sigma={s.sigma}":
                                                                    done["smoothing-noise"]},
                title="randomized smoothing (mnist5k)")
    plot_curves(d / "plots" / "ibp_certified_accuracy.png",
                {"ibp model": done["ibp-ibp"], "standard model": done["ibp-standard"]}, title="IBP (mnist5k)")
    atomic_write_json(d / "results.json", {"settings": asdict(s), "smoothing": done["smoothing-noise"],
                                           "ibp": {"ibp": done["ibp-ibp"], "standard": done["ibp-standard"]}})


def _certified_at(res: dict[str, Any], radius: float) -> float:
    recs = res["per_sample"]
    return sum(r["correct"] and r["radius"] >= radius for r in recs) / max(len(recs), 1)


def benchmark_stage(out: Path, s: Settings, device: torch.device) -> None:
    from robustkit.app.benchmark import benchmark
    from robustkit.config import BenchmarkConfig

    cfg = BenchmarkConfig(models=[str(out / n) for n in ("standard", "finetune", "noise", "ibp")],
                          dataset="mnist5k", norm="linf", eps=str(s.eps), n=s.bench_n,
                          attacks=["autoattack", "pgd", "fast"], certify=["ibp"],
                          attack_params={k: dict(v) for k, v in (s.attack_params or {}).items()},
                          eps_grid=[str(e) for e in sorted({0.0, s.eps / 2, s.eps, 2 * s.eps, 3 * s.eps})],
                          out=str(out / "benchmark"))
    benchmark(cfg, device=device)


def write_report(out: Path, s: Settings, timings: dict[str, float]) -> Path:
    bench = _load_json(out / "benchmark" / "results.json")
    cert = _load_json(out / "certify" / "results.json")
    parts = [f"# robustkit quickstart report\n\nAll numbers on the embedded `mnist5k` data (4,000 train / 1,000 "
             f"test real MNIST digits), model `{s.arch}`, on {device_name()}. Settings: `settings.json`.\n\n"]
    parts.append(f"## Leaderboard (L-inf, eps = {s.eps})\n\nAutoAttack and our attacks ran on the first {s.bench_n} "
                 "test images (a subset, to keep the quickstart short; `--full` uses all 1000). The threat model is "
                 f"eps={s.eps}, the radius the fine-tuned and the IBP models were trained for; IBP certificates at "
                 "that radius are cross-checked against every attack (a certified point that an attack breaks would "
                 "stop the benchmark with a soundness error).\n\n")
    rows = []
    for e in bench.get("models", []):
        rows.append({"model": e.get("name"), "clean": e.get("clean_acc"), "AutoAttack": e.get("autoattack_acc", ""),
                     **{k: v for k, v in e.get("attacks", {}).items() if k != "autoattack"},
                     "worst case": e.get("robust_acc")})
    rows.sort(key=lambda r: -(r["AutoAttack"] if isinstance(r["AutoAttack"], float) else r["worst case"] or 0))
    parts.append(md_table(rows) if rows else "_benchmark missing_\n")
    if bench.get("flags"):
        parts.append(f"\nConsistency flags: `{json.dumps(bench['flags'])[:800]}`\n")
    if cert:
        sm, p = cert["smoothing"], cert["smoothing"]["params"]
        parts.append("\n## Certified robustness\n\nRandomized smoothing (Cohen et al. 2019) of the noise-trained "
                     f"model, sigma={p['sigma']}, n0={p['n0']}, n={p['n']}, alpha={p['alpha']}, {sm['n']} images "
                     f"(guarantee holds with probability >= 1 - alpha per image); average certified radius "
                     f"{sm['average_certified_radius']:.3f} ([report](certify/smoothing-noise/report.md)):\n\n")
        parts.append(md_table([{"L2 radius": r, "certified accuracy": a} for r, a in
                               zip(sm["curve"]["radius"][::2], sm["curve"]["certified_accuracy"][::2])]))
        parts.append("\n![smoothing](certify/plots/smoothing_certified_accuracy.png)\n\nIBP (deterministic) "
                     f"certified accuracy at L-inf eps={s.ibp_eps}: " + ", ".join(
                         f"{k} model {_certified_at(v, s.ibp_eps):.3f} (ACR {v['average_certified_radius']:.3f})"
                         for k, v in cert["ibp"].items())
                     + " (Gowal et al. 2018 report 97.08% verified at eps=0.1 on full MNIST with 60k training "
                       "images, a larger model and 100 epochs).\n\n![ibp](certify/plots/ibp_certified_accuracy.png)\n")
    parts.append("\n## Training curves\n\n")
    for name in ("standard", "finetune", "noise", "ibp"):
        if (out / name / "plots" / "training_curves.png").exists():
            parts.append(f"**{name}** ([report]({name}/report.md))\n\n![{name}]({name}/plots/training_curves.png)\n\n")
    parts.append("## Wall-clock\n\n" + md_table([{"stage": k, "seconds": v} for k, v in timings.items()]))
    return write_markdown(out, "".join(parts))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"
