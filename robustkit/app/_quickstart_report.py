"""The quickstart's ``report.md``: the leaderboard, certified accuracy, training curves and
wall-clock of a run of ``robustkit.app.quickstart`` (which see)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from robustkit.app import shard
from robustkit.data import load_data
from robustkit.report import md_table, write_markdown

# ``s`` below is a ``robustkit.app.quickstart.Settings`` (typed ``Any``: that module imports this one)
Settings = Any

def load_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text()) if p.is_file() else {}


def autoattack_label(s: Settings) -> str:
    """What the benchmark's ``autoattack`` column really is: standard AutoAttack only when no
    attack list or override narrows it."""
    p = (s.attack_params or {}).get("autoattack", {})
    if not p.get("attacks") and not p.get("overrides") and p.get("version", "standard") == "standard":
        return "AutoAttack"
    return " + ".join(a.upper() for a in p.get("attacks", [])) + " (AutoAttack's code; NOT standard AutoAttack)"


def _certified_at(res: dict[str, Any], radius: float) -> float:
    recs = res["per_sample"]
    return sum(r["correct"] and r["radius"] >= radius for r in recs) / max(len(recs), 1)


def write_report(out: Path, s: Settings, timings: dict[str, float]) -> Path:
    """``out/report.md`` from the stages' results (whatever of them exists)."""
    bench = load_json(out / "benchmark" / "results.json")
    cert = load_json(out / "certify" / "results.json")
    aa = autoattack_label(s)
    n_test = len(load_data(s.dataset, "test", s.data_root))
    subset = (f"the whole {n_test}-image test set" if s.bench_n >= n_test else
              f"the first {s.bench_n} test images (a subset, to keep the quickstart short)")
    parts = [f"# robustkit quickstart report\n\nAll numbers on {DATA_TEXT.get(s.dataset, f'`{s.dataset}`')}, model "
             f"`{s.arch}`, on {device_name()}. Settings: `settings.json`.\n\n"]
    parts.append(f"## Leaderboard (L-inf, eps = {s.eps})\n\n{aa}"
                 f"{' and our attacks' if len(s.bench_attacks) > 1 else ''} ran on {subset}. The threat model is "
                 f"eps={s.eps}, the radius the fine-tuned and the IBP models were trained for; IBP certificates at "
                 "that radius are cross-checked against every attack (a certified point that an attack breaks would "
                 "stop the benchmark with a soundness error).\n\n")
    rows = []
    for e in bench.get("models", []):
        rows.append({"model": e.get("name"), "clean": e.get("clean_acc"), aa: e.get("autoattack_acc", ""),
                     **{k: v for k, v in e.get("attacks", {}).items() if k != "autoattack"},
                     "worst case": e.get("robust_acc")})
    rows.sort(key=lambda r: -(r[aa] if isinstance(r[aa], float) else r["worst case"] or 0))
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
                     + (GOWAL if s.dataset == "mnist5k" else ".")
                     + "\n\n![ibp](certify/plots/ibp_certified_accuracy.png)\n")
    parts.append("\n## Training curves\n\n")
    for name in ("standard", "finetune", "noise", "ibp"):
        if (out / name / "plots" / "training_curves.png").exists():
            parts.append(f"**{name}** ([report]({name}/report.md))\n\n![{name}]({name}/plots/training_curves.png)\n\n")
    parts.append("## Wall-clock\n\n" + md_table([{"stage": k, "seconds": v} for k, v in timings.items()]))
    parts.append(throughput(s, cert, bench, timings))
    return write_markdown(out, "".join(parts))


def throughput(s: Settings, cert: dict[str, Any], bench: dict[str, Any], timings: dict[str, float]) -> str:
    """Images per second of smoothing (its wall-clock within the certify stage) and of the benchmark
    stage (models x images over the stage's wall-clock: clean pass, attacks and certificates)."""
    lines = []
    sm = cert.get("smoothing", {})
    if sm.get("wall_seconds"):
        w, n, p = sm["wall_seconds"], sm["n"], sm["params"]
        lines.append(f"- smoothing: {n} images in {w:.0f} s = {n / w:.2f} images/s "
                     f"({n * (p['n0'] + p['n']) / w:,.0f} noise samples/s)")
    if bench.get("models") and timings.get("benchmark"):
        k, w = len(bench["models"]), timings["benchmark"]
        lines.append(f"- benchmark ({autoattack_label(s)}{', ' if len(s.bench_attacks) > 1 else ''}"
                     f"{', '.join(a for a in s.bench_attacks if a != 'autoattack')}): {k} models x {s.bench_n} "
                     f"images in {w:.0f} s = {k * s.bench_n / w:.1f} images/s")
    return "\n" + "\n".join(lines) + "\n" if lines else ""


GOWAL = (" (Gowal et al. 2018 report 97.08% verified at eps=0.1 on full MNIST with 60k training images, a larger "
         "model and 100 epochs).")
DATA_TEXT = {"mnist5k": "the embedded `mnist5k` data (4,000 train / 1,000 test real MNIST digits)",
             "fashion-mnist": "the full Fashion-MNIST (60,000 train / 10,000 test images, Xiao et al. 2017)"}


def device_name() -> str:
    w = shard.world()
    procs = f", {w.size} torchrun processes" if w.distributed else ""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0) + procs
    return f"CPU ({torch.get_num_threads()} threads{procs})"
