"""The main job end to end -- by default on the embedded mnist5k data (about 13 minutes on 2 CPU
cores); ``full=True`` runs it on the full Fashion-MNIST (60,000 / 10,000, ``robustkit.data``):

1. ``standard``   standard training of the IBP small CNN (the "pretrained" model);
2. ``finetune``   adversarial fine-tuning of it with TRADES + AWP and the slow-start-fast-decay
                  schedule (Jeddi et al. 2020);
3. ``noise``      Gaussian-noise training (the base classifier of randomized smoothing);
4. ``ibp``        IBP certified training (Gowal et al. 2018);
5. ``certify``    smoothing radii of the noise model, IBP radii of the IBP model;
6. ``benchmark``  clean / AutoAttack / PGD / fast-ensemble accuracy of all four models;
7. ``report.md``  one page with the leaderboard, certified-accuracy curves and training curves.

Every stage writes into its own directory under ``out`` and is skipped when its results
exist, so an interrupted quickstart resumes where it stopped.

``full=True`` (``Settings.full()``; the same stages as the recipes ``configs/*_fashion_full.yaml``):
training on all 60,000 images, IBP certificates and the benchmark on all 10,000 test images,
smoothing on the first ``smoothing_images`` of them. Standard AutoAttack does not fit a CPU
budget there, so the benchmark runs AutoAttack's two untargeted APGD attacks (APGD-CE +
APGD-DLR, the package's own code and defaults) and the report says so: it is *not* the
standard AutoAttack. Under ``torchrun`` training is DDP, certification (and the benchmark,
where its pipeline shards) is split over the ranks, and only rank 0 writes the quickstart's
own files (``settings.json``, ``timings.json``, ``report.md``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustkit.app import shard
from robustkit.app._quickstart_report import autoattack_label, load_json, write_report
from robustkit.config import BenchmarkConfig, TrainConfig, from_dict
from robustkit.data import load_data
from robustkit.io import atomic_write_json
from robustkit.zoo import load


@dataclass(frozen=True)
class Settings:
    dataset: str = "mnist5k"
    data_root: str | None = None          # where the dataset's files are (None: its default places)
    n_train: int | None = None            # first n training images (None: all)
    batch_size: int = 128                 # per process (DDP: the global batch is this x the processes)
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
    bench_n: int = 500                    # benchmark subset (first n test images, a shuffled split)
    bench_attacks: tuple[str, ...] = ("autoattack", "pgd", "fast")
    eps_curve: bool = True                # the benchmark's PGD robust-accuracy-vs-eps curve
    ibp_images: int = 1000
    attack_params: dict[str, dict[str, Any]] | None = None  # per-attack overrides for the benchmark

    @classmethod
    def make(cls, full: bool) -> Settings:
        return cls.full() if full else cls()

    @classmethod
    def full(cls, data_root: str | None = None) -> Settings:
        """The full-size run: Fashion-MNIST, sized for about 30-40 minutes on 2 CPU cores with 2
        torchrun processes (see ``configs/*_fashion_full.yaml``)."""
        return cls(dataset="fashion-mnist", data_root=data_root, pretrain_epochs=8, finetune_epochs=3,
                   trades_steps=5, noise_epochs=8, ibp_epochs=6, eval_n=1000, smoothing_images=500,
                   smoothing_n=10_000, bench_n=10_000, ibp_images=10_000, bench_attacks=("autoattack",),
                   eps_curve=False, attack_params={"autoattack": {"attacks": list(FULL_AA_ATTACKS)}})


FULL_AA_ATTACKS = ("apgd-ce", "apgd-dlr")       # the full run's benchmark: AutoAttack's untargeted APGDs


def _train_cfg(s: Settings, epochs: int, **sections: dict[str, Any]) -> TrainConfig:
    """A stage's ``TrainConfig``: the shared base (``s.arch`` on ``s.dataset``, per-epoch 10-step PGD
    at ``s.eps`` on the first ``s.eval_n`` test images) with the stage's own keys per section."""
    data: dict[str, Any] = {"epochs": epochs, **sections}
    data["model"] = {"arch": s.arch, **sections.get("model", {})}
    base = {"name": s.dataset, "root": s.data_root, "n_train": s.n_train, "batch_size": s.batch_size}
    data["data"] = {**{k: v for k, v in base.items() if v is not None}, **sections.get("data", {})}
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


def plan(s: Settings, out: str | Path) -> list[str]:
    """One line per stage: what ``run_quickstart`` with ``s`` will do (``robustkit quickstart --plan``)."""
    out = Path(out)
    lines = [f"quickstart on {s.dataset} -> {out} (settings: {json.dumps(asdict(s), default=str)})"]
    for name, cfg in stage_configs(s, out).items():
        d, wp = cfg.defense, cfg.defense.weight_perturbation
        src = f", from {cfg.model.pretrained}" if cfg.model.pretrained else ""
        what = d.name + (f" + {wp}" if wp else "") + (f" {d.params}" if d.params else "")
        lines.append(f"  {name:<9}  {cfg.model.arch} {what}, "
                     f"{cfg.epochs} epochs, schedule {cfg.schedule.name}, {cfg.data.n_train or 'all'} training "
                     f"images, batch {cfg.data.batch_size} per process{src}")
    lines.append(f"  certify    smoothing (noise model): sigma={s.sigma} n0={s.smoothing_n0} n={s.smoothing_n} "
                 f"alpha={s.alpha} on {s.smoothing_images} test images; IBP L-inf eps={s.ibp_eps} (ibp and standard "
                 f"models) on {s.ibp_images} test images")
    b = benchmark_config(out, s)
    lines.append(f"  benchmark  {', '.join(autoattack_label(s) if a == 'autoattack' else a for a in b.attacks)}, "
                 f"L-inf eps={s.eps}, first {b.n} test images, models {', '.join(Path(m).name for m in b.models)}, "
                 f"IBP certificates; PGD eps curve: {'yes' if b.eps_grid else 'no'}")
    return lines


def _done(d: Path) -> bool:
    return (d / "results.json").is_file()


def run_quickstart(out: str | Path, device: torch.device, full: bool = False, progress: bool = True,
                   log: Callable[[str], None] = lambda m: None, settings: Settings | None = None) -> Path:
    """Run (or resume) every stage; returns the path of the combined ``report.md``.
    ``settings`` overrides the default / ``full`` settings (the tests use tiny ones). Under
    ``torchrun`` every rank calls it; rank 0 logs and writes the quickstart's own files."""
    from robustkit.app.train import train

    w, device = shard.setup(device)
    out = Path(out)
    s = settings or Settings.make(full)
    for split in ("train", "test"):               # the data must be there before anything is written
        load_data(s.dataset, split, s.data_root)
    say = log if w.is_main else (lambda m: None)
    timings: dict[str, float] = {}
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "settings.json", asdict(s))
        timings = load_json(out / "timings.json")

    def stage(name: str, what: str, run: Callable[[], None], skipped: str = "done already") -> None:
        if shard.broadcast(_done(out / name)):     # rank 0's view, so every rank skips the same stages
            say(f"[{name}] {skipped}: {out / name}")
            return
        say(f"[{name}] {what}")
        t0 = time.perf_counter()
        run()
        shard.barrier()                           # the stage's files are written before the next one reads
        if w.is_main:
            timings[name] = time.perf_counter() - t0
            atomic_write_json(out / "timings.json", timings)

    for name, cfg in stage_configs(s, out).items():
        wp = cfg.defense.weight_perturbation
        resume = shard.broadcast((out / name / "checkpoints").exists())

        def run_train(cfg: TrainConfig = cfg, d: Path = out / name, resume: bool = resume) -> None:
            train(cfg, d, device, resume=resume, progress=progress)

        stage(name, f"training {cfg.model.arch} on {s.dataset} with {cfg.defense.name}{' + ' + wp if wp else ''}, "
                    f"{cfg.epochs} epochs{' (resuming)' if resume else ''} -> {out / name}", run_train)
    stage("certify", f"smoothing radii (noise model, {s.smoothing_images} images), IBP radii (ibp and standard "
                     f"models, {s.ibp_images} images)", lambda: certify_stage(out, s, device, progress),
          "results exist")
    stage("benchmark", f"{', '.join(autoattack_label(s) if a == 'autoattack' else a for a in s.bench_attacks)} "
                       f"on the first {s.bench_n} test images", lambda: benchmark_stage(out, s, device, progress),
          "results exist")
    report = out / "report.md"
    if w.is_main:
        report = write_report(out, s, timings)
    shard.barrier()
    return report


def certify_stage(out: Path, s: Settings, device: torch.device, progress: bool) -> None:
    """Smoothing radii (L2) of the noise model; IBP radii (L-inf) of the IBP model and, for contrast,
    of the standard one -- on the one certification pipeline (``robustkit.app.certify``), seed 0
    (the CLI's and the benchmark's default), each run resumable under ``out/certify/<run>``. Under
    torchrun the images are shared out over the ranks; rank 0 writes the outputs."""
    from certify.ibp import IBPCertifier
    from certify.smoothing import SmoothingCertifier
    from robustkit.app._certify_report import plot_curves, write_outputs
    from robustkit.app.certify import Points, certify_points

    test = load_data(s.dataset, "test", s.data_root)
    d = out / "certify"
    main = shard.world().is_main
    smoothing = SmoothingCertifier(sigma=s.sigma, n0=s.smoothing_n0, n=s.smoothing_n, alpha=s.alpha)
    ibp = IBPCertifier(eps=s.ibp_eps)                     # the one default bisection: tol 1e-3 on [0, 1]
    runs = {"smoothing-noise": ("noise", smoothing, s.smoothing_images),
            "ibp-ibp": ("ibp", ibp, s.ibp_images), "ibp-standard": ("standard", ibp, s.ibp_images)}
    done: dict[str, dict[str, Any]] = {}
    for run, (name, certifier, n) in runs.items():
        model = load(out / name, map_location=device)
        points = Points.first(*test.tensors(n), s.dataset)
        t0 = time.perf_counter()
        done[run] = certify_points(model, points, certifier, seed=0, resume=True, out=d / run, progress=progress)
        done[run]["processes"], done[run]["wall_seconds"] = shard.world().size, time.perf_counter() - t0
        if main:
            write_outputs(d / run, done[run], model=str(out / name))
    if not main:
        return
    plot_curves(d / "plots" / "smoothing_certified_accuracy.png", {f"noise model, sigma={s.sigma}":
                                                                    done["smoothing-noise"]},
                title=f"randomized smoothing ({s.dataset})")
    plot_curves(d / "plots" / "ibp_certified_accuracy.png",
                {"ibp model": done["ibp-ibp"], "standard model": done["ibp-standard"]}, title=f"IBP ({s.dataset})")
    atomic_write_json(d / "results.json", {"settings": asdict(s), "smoothing": done["smoothing-noise"],
                                           "ibp": {"ibp": done["ibp-ibp"], "standard": done["ibp-standard"]}})


def benchmark_config(out: Path, s: Settings) -> BenchmarkConfig:
    """The benchmark of the four models (``s.bench_attacks`` on the first ``s.bench_n`` test images,
    IBP certificates at ``s.eps``, optionally the PGD curve over 5 eps values up to ``3 * s.eps``)."""
    grid = sorted({0.0, s.eps / 2, s.eps, 2 * s.eps, 3 * s.eps}) if s.eps_curve else []
    return BenchmarkConfig(models=[str(out / n) for n in ("standard", "finetune", "noise", "ibp")],
                           dataset=s.dataset, data_root=s.data_root, norm="linf", eps=str(s.eps), n=s.bench_n,
                           attacks=list(s.bench_attacks), certify=["ibp"],
                           attack_params={k: dict(v) for k, v in (s.attack_params or {}).items()},
                           eps_grid=[str(e) for e in grid], out=str(out / "benchmark"))


def benchmark_stage(out: Path, s: Settings, device: torch.device, progress: bool = True) -> None:
    from robustkit.app.benchmark import benchmark

    benchmark(benchmark_config(out, s), device=device, progress=progress)
