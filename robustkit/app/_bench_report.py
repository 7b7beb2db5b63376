"""The benchmark's records: one RobustBench-style entry per model, the per-point breakdown,
consistency flags, ``results.json``, ``report.md``, the plots and ``robustbench/<name>.json`` (see
``robustkit.app.benchmark``). Reported rows (RobustBench ``model_info`` files, ``res["reported"]``,
``robustkit.app._robustbench``) join only the leaderboard, marked "reported, not evaluated here"."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit._evaluation import per_class
from robustkit.app._robustbench import STATUS, THREAT, write_model_infos
from robustkit.config import BenchmarkConfig
from robustkit.io import atomic_write, atomic_write_json
from robustkit.report import fmt, line_plot, md_table, write_markdown, write_results


def acc(mask: torch.Tensor) -> float:
    """Fraction of ``True`` in a ``(N,)`` bool mask (exact, not float32-rounded)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().squeeze(1).tolist()


# -- one model's entry ------------------------------------------------------------------------
def make_entry(name: str, model: nn.Module, source: str | None, cfg: BenchmarkConfig, correct: torch.Tensor,
               broken: dict[str, torch.Tensor], subs: dict[str, list[str | None]], meta: dict[str, Any],
               certified: dict[str, Any], cert_flags: dict[str, torch.Tensor], curve: dict[str, list[float]] | None,
               seconds: dict[str, float], labels: torch.Tensor | None = None) -> dict[str, Any]:
    """``correct`` and ``broken[attack]`` (verified) are ``(N,)`` bool; a point is robust if no attack
    broke it. With ``labels (N,)``: ``worst_class_robust_acc`` (worst case over every attack, as
    ``robust_acc``, in the class of lowest such accuracy; ties: lowest class id), ``worst_class`` and
    ``per_class`` rows (``robustkit._evaluation.per_class``)."""
    any_broken = torch.stack(list(broken.values())).any(0)                     # (N,)
    e: dict[str, Any] = {"name": name, "architecture": getattr(model, "arch", type(model).__name__),
                         "dataset": cfg.dataset, "threat_model": THREAT[cfg.norm], "eps": cfg.eps_value,
                         "n": int(correct.numel()), "source": source, "clean_acc": acc(correct)}
    if "autoattack" in broken:
        e["autoattack_acc"] = acc(correct & ~broken["autoattack"])
        aa = meta["autoattack"]
        e["autoattack"] = {k: aa.get(k) for k in ("package", "package_version", "version", "attacks")}
    e["robust_acc"] = acc(correct & ~any_broken)
    if labels is not None:
        pc = per_class(labels, correct, correct & ~any_broken)
        e.update(worst_class_robust_acc=pc["worst_class_robust_accuracy"], worst_class=pc["worst_class"],
                 per_class=pc["per_class"])
    e["attacks"] = {a: acc(correct & ~b) for a, b in broken.items()}
    e["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    e["certified"] = certified
    e["breakdown"] = breakdown(broken, subs)
    e["eps_curve"] = curve
    e["attack_params"] = {a: m.get("params", {}) for a, m in meta.items()}
    e["flags"] = flags(broken, cert_flags, meta)
    return e


def breakdown(broken: dict[str, torch.Tensor], subs: dict[str, list[str | None]]) -> dict[str, Any]:
    """Per attack: points broken, points only it broke, its sub-attacks' counts; per point: who broke it."""
    per_attack = {}
    for a, b in broken.items():
        others = torch.stack([o for k, o in broken.items() if k != a] + [torch.zeros_like(b)]).any(0)
        sub = Counter(subs[a][i] for i in _indices(b) if subs[a][i] is not None)
        per_attack[a] = {"broken": int(b.sum()), "only_this_attack": int((b & ~others).sum()),
                         "sub_attacks": dict(sub)}
    any_broken = torch.stack(list(broken.values())).any(0)
    per_point = {str(i): [a if subs[a][i] is None else f"{a}/{subs[a][i]}" for a, b in broken.items() if b[i]]
                 for i in _indices(any_broken)}
    return {"per_attack": per_attack, "broken_by": per_point}


def flags(broken: dict[str, torch.Tensor], cert_flags: dict[str, torch.Tensor], meta: dict[str, Any]
          ) -> dict[str, Any]:
    """``weaker_autoattack``: points our attacks broke that AutoAttack did not; ``soundness_violations``:
    points broken although certified at eps; ``unverified_successes``: claims that failed the re-check."""
    out: dict[str, Any] = {"weaker_autoattack": {}, "soundness_violations": [], "unverified_successes": {}}
    if "autoattack" in broken:
        aa = broken["autoattack"]
        out["weaker_autoattack"] = {a: _indices(b & ~aa) for a, b in broken.items()
                                    if a != "autoattack" and bool((b & ~aa).any())}
    out["soundness_violations"] = [{"certifier": c, "attack": a, "index": i}
                                   for c, cert in cert_flags.items() for a, b in broken.items()
                                   for i in _indices(cert & b)]
    out["unverified_successes"] = {a: m["unverified"] for a, m in meta.items() if m.get("unverified")}
    return out


def leaderboard_order(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sorted by AutoAttack accuracy (else worst-case robust accuracy), best first (reported rows:
    their AutoAttack accuracy)."""
    def key(e: dict[str, Any]) -> tuple[float, float, str]:
        score = e.get("autoattack_acc", e.get("robust_acc", 0.0))
        return -score, -e.get("robust_acc", score), e["name"]

    return sorted(entries, key=key)


def leaderboard(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluated and reported rows in one ranking: ``{rank, name, evaluated, clean_acc, autoattack_acc?,
    robust_acc?}`` (reported rows: ``status`` "reported, not evaluated here", ``source``)."""
    rows = []
    for i, e in enumerate(leaderboard_order([*res["models"], *res.get("reported", [])])):
        r: dict[str, Any] = {"rank": i + 1, "name": e["name"], "evaluated": e.get("evaluated", True),
                             "clean_acc": e["clean_acc"]}
        r.update({k: e[k] for k in ("autoattack_acc", "robust_acc", "rejection_robust_acc", "rejection_curve_auc")
                  if k in e})
        if not r["evaluated"]:
            r.update(status=e["status"], source=e["source"])
        rows.append(r)
    return rows


# -- outputs ----------------------------------------------------------------------------------
def write_all(out: Path, res: dict[str, Any]) -> dict[str, Any]:
    """Adds ``res["leaderboard"]``, then writes ``results.json``, ``robustbench/<name>.json`` (evaluated
    entries), ``plots/*.png`` and ``report.md`` (each atomically); returns ``res``."""
    res["leaderboard"] = leaderboard(res)
    write_results(out, res)
    write_model_infos(out, res["models"], res["settings"])
    plots = write_plots(out, res["models"], res["settings"])
    text = markdown(res, plots)
    if res.get("transfer_matrix"):          # transfer success matrix: heat map + table
        from robustkit.app import _bench_transfer as tr

        tr.heatmap(out / "plots" / "transfer_matrix.png", res["transfer_matrix"])
        text += tr.markdown(res["transfer_matrix"], "plots/transfer_matrix.png")
    write_markdown(out, text)
    return res


def reported_only(out: Path, res: dict[str, Any]) -> dict[str, Any]:
    """A leaderboard of reported rows only (``res["models"] == []``): nothing was evaluated, no data or
    model loaded; written by rank 0 alone under torchrun (``write_all``), ``res`` returned on every rank."""
    from robustkit.app.shard import world

    return write_all(out, res) if world().is_main else res


def write_plots(out: Path, entries: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    made = []
    curves = {e["name"]: (e["eps_curve"]["eps"], e["eps_curve"]["robust_acc"]) for e in entries if e["eps_curve"]}
    if curves:
        line_plot(out / "plots" / "robust_accuracy_vs_eps.png", curves, xlabel=f"eps ({THREAT[s['norm']]})",
                  ylabel="robust accuracy (PGD)", title=f"robust accuracy vs eps, {s['dataset']}")
        made.append("plots/robust_accuracy_vs_eps.png")
    for norm, series in certified_curves(entries, s).items():
        path = f"plots/certified_accuracy_{norm}.png"
        certified_plot(out / path, series, norm, s["dataset"], s["eps"] if norm == s["norm"] else None)
        atomic_write_json(out / f"plots/certified_accuracy_{norm}.json", {"norm": norm, "series": series})
        made.append(path)
    return made


NORM_LABEL = {"linf": "L-inf", "l2": "L2"}


def certified_curves(entries: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """What the certified-accuracy plots show: ``{norm: {label: {"radius": [...], "certified_accuracy": [...],
    "model", "certifier", "smoothed", "points"}}}``, one series per (model, certifier) whose record is
    ``ok``, grouped by the norm its certificate is in (smoothing: always L2), so L2 and L-inf radii never
    share an axis. Certifiers with per-image radii give their exact curve (``exact_curve``, a step
    function, ``points`` False); injected at-eps certifiers give the one point ``(eps,
    certified_acc)`` (``points`` True). Smoothing labels say they certify the smoothed classifier."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in entries:
        for c, r in e["certified"].items():
            if r.get("status") != "ok":
                continue
            norm = r.get("norm", s["norm"])
            if r.get("per_sample"):
                (xs, ys), points = exact_curve(r["per_sample"]), False
            elif "curve" in r:
                xs, ys, points = r["curve"]["radius"], r["curve"]["certified_accuracy"], False
            elif "certified_acc" in r:
                xs, ys, points = [r.get("eps", s["eps"])], [r["certified_acc"]], True
            else:
                continue
            smoothed = "sigma" in r
            what = (f"{'dual ' if c == 'dual-smoothing' else ''}smoothed classifier, sigma={r['sigma']:g}"
                    if smoothed else "at eps only" if points else "")
            label = f"{e['name']} {c}" + (f" ({what})" if what else "")
            out.setdefault(norm, {})[label] = {"radius": list(xs), "certified_accuracy": list(ys), "model": e["name"],
                                               "certifier": c, "smoothed": smoothed, "points": points}
    return {n: out[n] for n in sorted(out)}


def exact_curve(per_sample: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The exact certified-accuracy step function of per-image records (``radius``, ``correct``):
    ``xs = [0, r_1 < ... < r_m]`` (the distinct radii of the correct points), ``ys[0]`` the fraction
    correct, ``ys[k]`` the fraction certified beyond ``r_k`` (radius > r_k): plotted with steps after
    each ``x``, the curve drops at each certified radius, with no radius grid in between."""
    n = max(len(per_sample), 1)
    radii = sorted(float(p["radius"]) for p in per_sample if p["correct"])
    xs = [0.0, *sorted({r for r in radii if r > 0.0})]
    ys = [len(radii) / n] + [sum(r > x for r in radii) / n for x in xs[1:]]
    return xs, ys


def certified_plot(path: Path, series: dict[str, dict[str, Any]], norm: str, dataset: str,
                   eps: float | None = None) -> Path:
    """One PNG of ``certified_curves(...)[norm]``: step curves, single at-eps points as markers, and the
    threat model's ``eps`` (when it is in this norm) as a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for label, d in series.items():
        if d["points"]:
            ax.plot(d["radius"], d["certified_accuracy"], marker="D", ls="none", label=label)
        else:
            ax.step(d["radius"], d["certified_accuracy"], where="post", ls="--" if d["smoothed"] else "-",
                    label=label)
    if eps is not None:
        ax.axvline(eps, color="grey", ls=":", lw=1, label=f"threat eps = {eps:g}")
    ax.set_xlabel(f"{NORM_LABEL[norm]} radius (pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"certified accuracy vs {NORM_LABEL[norm]} radius, {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def _row(rank: int, e: dict[str, Any], attacks: list[str], certs: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"rank": rank, "model": e["name"], "architecture": e["architecture"],
                           "clean": e["clean_acc"]}
    if "autoattack_acc" in e:
        row["AutoAttack"] = e["autoattack_acc"]
    row.update({a: e["attacks"][a] for a in attacks if a != "autoattack"})
    row["worst case"] = e["robust_acc"]
    row["worst class"] = e.get("worst_class_robust_acc", "n/a")
    if "adversarial_sparsity" in e:          # mean over vulnerable points (higher: sparser, more robust)
        mean = e["adversarial_sparsity"]["mean"]
        row["sparsity"] = "n/a" if mean is None else mean
    if "corruptions_acc" in e:
        row["corruptions"] = e["corruptions_acc"]
    if "rejection_robust_acc" in e:          # CPR: robust accuracy with rejection at alpha 0, curve AUC
        row["with rejection (CPR)"] = e["rejection_robust_acc"]
        row["rejection AUC"] = e["rejection_curve_auc"]
    for c in certs:
        r = e["certified"].get(c, {})
        row[f"certified ({c})"] = r.get("certified_acc", "n/a")
    row["seconds"] = f"{sum(e['seconds'].values()):.1f}"
    return row


def _reported_row(rank: int, e: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(columns, "-")
    row.update({"rank": rank, "model": e["name"], "architecture": e["architecture"] or "-", "clean": e["clean_acc"],
                "AutoAttack": e["autoattack_acc"], "numbers": STATUS + (" (flagged, see below)" if e["flags"] else "")})
    return row


def markdown(res: dict[str, Any], plots: list[str]) -> str:
    s, entries, reported = res["settings"], res["models"], res.get("reported", [])
    # certified accuracy at eps; smoothing only on L2 threat models (else it has no number at eps)
    certs = list(dict.fromkeys(c for e in entries for c, r in e["certified"].items()
                               if c not in ("smoothing", "dual-smoothing") or s["norm"] == "l2"))
    board = leaderboard_order([*entries, *reported])
    rows = [_row(i + 1, e, s["attacks"], certs) for i, e in enumerate(board) if e.get("evaluated", True)]
    columns = list(rows[0]) if rows else ["rank", "model", "architecture", "clean", "AutoAttack"]
    if reported:
        if "AutoAttack" not in columns:       # reported rows always carry one
            columns.insert(columns.index("clean") + 1, "AutoAttack")
        columns.append("numbers")
        rows += [_reported_row(i + 1, e, columns) for i, e in enumerate(board) if not e.get("evaluated", True)]
        for r in rows:
            r.setdefault("numbers", "evaluated here")
            r.setdefault("AutoAttack", "-")
        rows.sort(key=lambda r: r["rank"])
    key = "AutoAttack" if "autoattack" in s["attacks"] or not entries else "worst-case robust"
    scope = (f"First {s['n']} test images; attacks {', '.join(s['attacks'])}, each run independently on every "
             f"clean-correct point; **worst case** = a point counts as robust only if every attack failed on it. "
             if entries else "No model was evaluated here: every row is a number reported in a RobustBench "
             "model_info file. ")
    parts = [f"# Benchmark: {s['dataset']}, {THREAT[s['norm']]} eps = {s['eps']:g}\n\n",
             f"{scope}Sorted by {key} accuracy.\n\n", md_table(rows, columns)]
    if reported:
        parts.append(_reported_section(reported))
    if any(c in ("smoothing", "dual-smoothing") for c in s["certify"]):
        parts.append("\nRandomized smoothing (and dual smoothing) certifies the *smoothed* classifier (L2, with "
                     "probability >= 1 - alpha), not the base model the attacks ran on, so it is not compared "
                     "against them.\n")
    if plots_cert := [p for p in plots if "certified_accuracy_" in p]:
        parts.append(f"\nCertified accuracy vs radius, one plot per norm ({', '.join(plots_cert)}; the plotted data "
                     "next to each as .json): every (model, certifier) of that norm; dashed: smoothed classifiers; "
                     "markers: certifiers known only at eps.\n")
    if "reject" in s:
        r = s["reject"]
        parts.append(f"\n**with rejection (CPR)**: Chen et al. 2023's robust accuracy with rejection at alpha 0 "
                     f"(rejecting an unperturbed point costs, rejecting a perturbed one is free) on the first "
                     f"{r['n_images']} images, rejector {r['rejector']}; **rejection AUC**: the robustness curve's "
                     f"mean over alpha in [{r['alphas'][0]:g}, {r['alphas'][-1]:g}] (see each model's section).\n")
    parts += [f"\n![{p}]({p})\n" for p in plots]
    for e in entries:
        parts.append(_model_section(e))
    return "".join(parts)


def _reported_section(reported: list[dict[str, Any]]) -> str:
    text = ["\n**Reported, not evaluated here:** the rows marked so are numbers taken as written in RobustBench "
            "model_info files (RobustBench: standard AutoAttack on its own test set, e.g. all 10,000 CIFAR-10 "
            "test images), not re-run by robustkit; they take no part in the soundness checks or the per-point "
            "tables. The evaluated rows' AutoAttack is what ran here (each model's section says which).\n\n"]
    for e in reported:
        title = f"[{e['title']}]({e['link']})" if e["link"] else e["title"]
        best = f", best known {fmt(e['best_known_acc'])}" if "best_known_acc" in e else ""
        text.append(f"- {e['name']}: {title}, from `{e['source']}`: clean {fmt(e['clean_acc'])}, AutoAttack "
                    f"{fmt(e['autoattack_acc'])}{best}"
                    + (f"; footnote: {e['footnote']}" if e.get("footnote") else "")
                    + "".join(f"; **Flag:** {v}" for v in e["flags"].values()) + "\n")
    return "".join(text)


def _curve_text(r: dict[str, Any]) -> str:
    """Smoothing on an L-inf benchmark: certified L2 accuracy at a few radii (up to 2 sigma)."""
    pts = [(x, a) for x, a in zip(r["curve"]["radius"], r["curve"]["certified_accuracy"]) if x <= 2 * r["sigma"]][::2]
    return (f"smoothed classifier, sigma={r['sigma']:g}, {r['n_images']} images, certified accuracy at L2 radius "
            + ", ".join(f"{x:g}: {fmt(a)}" for x, a in pts))


def _model_section(e: dict[str, Any]) -> str:
    bd = e["breakdown"]["per_attack"]
    rows = [{"attack": a, "accuracy": acc, "broken": bd[a]["broken"], "only this attack": bd[a]["only_this_attack"],
             "sub-attacks": ", ".join(f"{k}: {v}" for k, v in bd[a]["sub_attacks"].items()) or "-",
             "seconds": e["seconds"].get(a, 0.0)} for a, acc in e["attacks"].items()]
    text = [f"\n## {e['name']} ({e['architecture']})\n\n", md_table(rows)]
    if "autoattack" in e:
        aa = e["autoattack"]
        text.append(f"\nAutoAttack: {aa.get('package')} {aa.get('package_version')}, version {aa.get('version')}, "
                    f"attacks {', '.join(aa.get('attacks') or [])}.\n")
    if e.get("adversarial_sparsity"):
        sp = e["adversarial_sparsity"]
        val = ("n/a (no vulnerable point)" if sp["mean"] is None
               else f"mean {fmt(sp['mean'])}, median {fmt(sp['median'])}")
        text.append(f"\n- adversarial sparsity: {val} over {sp['n_vulnerable']} vulnerable of the first {sp['n']} "
                    f"points ({sp['directions']} directions; 1 = no constrained attack succeeds)\n")
    if e.get("rejection"):
        rj = e["rejection"]
        text.append(f"\n- CPR rejection ({rj['n']} images): clean rejection rate {fmt(rj['clean_rejection_rate'])}, "
                    f"robust accuracy with rejection (free) {fmt(rj['robust_accuracy_with_rejection'])}; by alpha: "
                    + ", ".join(f"{c['alpha']:g}: {fmt(c['robust_accuracy'])}" for c in rj["curve"]) + "\n")
    for c, r in e["certified"].items():
        val = (f"certified accuracy {fmt(r['certified_acc'])} at eps" if "certified_acc" in r else
               _curve_text(r) if r.get("status") == "ok" else f"n/a ({r.get('reason')})")
        text.append(f"\n- certified ({c}): {val}\n")
    f = e["flags"]
    if f["weaker_autoattack"]:
        text.append("\n**Flag:** points our attacks broke but AutoAttack did not: " + "; ".join(
            f"{a}: {len(v)} ({', '.join(map(str, v[:10]))}{', ...' if len(v) > 10 else ''})"
            for a, v in f["weaker_autoattack"].items()) + "\n")
    if f["soundness_violations"]:
        text.append(f"\n**SOUNDNESS VIOLATION:** {len(f['soundness_violations'])} point(s) broken although "
                    "certified at eps: " + ", ".join(f"{v['attack']} vs {v['certifier']} at point {v['index']}"
                                                    for v in f["soundness_violations"][:10]) + "\n")
    if f["unverified_successes"]:
        text.append("\n**Flag:** claimed successes that failed the re-check (label not flipped, or outside the "
                    f"ball / [0, 1]), not counted: {f['unverified_successes']}\n")
    return "".join(text)
