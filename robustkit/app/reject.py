"""The ``robustkit reject`` pipeline: selective classification with CPR and its stratified metrics.

Chen et al., "Stratified Adversarial Robustness with Rejection", ICML 2023 (``attacks/cpr.py``; code
``jfc43/stratified-adv-rej``, ``eval_cpr.py`` ``eval_outer_attack`` / ``eval_inner_attack`` /
``eval_robustness_curve``). Per test point ``x`` with label ``y`` and budget ``eps``:

- ``outer_error``: some ``x'`` in ``B(x, eps)`` (``x`` itself included) is *accepted* by CPR and
  misclassified. Candidates: ``x``, each registered attack's output on the base model (``--attack``, e.g.
  ``pgd`` or ``autoattack``) and the BPDA outer attack through CPR (untargeted, then multi-targeted over the
  wrong classes); the OR over them (the code ORs its attacks).
- ``inner_rejected[alpha]``: some ``x'`` in ``B(x, alpha * eps)`` is *rejected* (``alpha = 0``: ``x`` is).

The robust accuracy with rejection at ``alpha`` (the total robust accuracy under the step rejection loss:
rejecting a point perturbed within ``alpha * eps`` costs, beyond it is free) is
``1 - mean(outer_error | inner_rejected[alpha])``; the curve over the code's ``ALPHA_LIST`` is the paper's
robustness curve. ``robust_accuracy_with_rejection`` (no inner term: rejection always free) is the code's
"robustness with reject". ``curve_auc`` (trapezoid over the alpha grid, divided by its span) is our summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.cpr import CPR, inner_attack, outer_attack
from robustkit.app.build import build_attack
from robustkit.app.sharded_eval import check_output_dir
from robustkit.data import make_loader
from robustkit.errors import InputError
from robustkit.report import line_plot, md_table, write_markdown, write_results
from robustkit.threat import parse_eps, parse_norm
from robustkit.zoo import check_compatible, load

ALPHAS = (0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0)   # utils/constants.py ALPHA_LIST


def stratified_accuracy(outer_error: Sequence[bool] | np.ndarray,
                        inner_rejected: Mapping[float, Sequence[bool] | np.ndarray]) -> dict[str, Any]:
    """The stratified metrics from per-point outcomes (``eval_robustness_curve``).

    ``outer_error (N,)``: accepted and misclassified somewhere in the ``eps``-ball; ``inner_rejected``:
    ``alpha -> (N,)`` rejected somewhere in the ``alpha * eps``-ball. Returns ``robust_accuracy_with_rejection``
    ``= 1 - mean(outer_error)``, ``curve`` ``[{"alpha", "rejection_rate", "robust_accuracy"}]`` (sorted by alpha)
    with ``robust_accuracy = 1 - mean(outer_error | inner_rejected[alpha])``, and ``curve_auc``."""
    err = np.asarray(outer_error, dtype=bool).reshape(-1)
    n = max(err.size, 1)
    curve = []
    for a in sorted(inner_rejected):
        rej = np.asarray(inner_rejected[a], dtype=bool).reshape(-1)
        if rej.size != err.size:
            raise InputError(f"inner_rejected[{a}] has {rej.size} points, outer_error has {err.size}")
        curve.append({"alpha": float(a), "rejection_rate": float(rej.sum() / n),
                      "robust_accuracy": float(1.0 - np.count_nonzero(err | rej) / n)})
    xs, ys = [c["alpha"] for c in curve], [c["robust_accuracy"] for c in curve]
    auc = float(np.trapezoid(ys, xs) / (xs[-1] - xs[0])) if len(xs) > 1 and xs[-1] > xs[0] else \
        (ys[0] if ys else float("nan"))
    return {"robust_accuracy_with_rejection": float(1.0 - err.sum() / n), "curve": curve, "curve_auc": auc}


def _alphas(alphas: Sequence[float]) -> list[float]:
    out = sorted({float(a) for a in alphas})
    if not out or any(not 0.0 <= a <= 1.0 for a in out):
        raise InputError(f"alphas must be numbers in [0, 1] (fractions of eps), got {list(alphas)}")
    return out


def evaluate_batch(model: torch.nn.Module, cpr: CPR, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   alphas: Sequence[float], attacks: Sequence[Any], steps: int, restarts: int, targets: int = 0,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """Per-point outcomes on one batch: ``clean_correct``, ``clean_rejected``, ``outer_error`` ``(B,)`` bool and
    ``inner_rejected`` ``{alpha: (B,)}`` (numpy), monotone in alpha: ``B(x, a * eps)`` lies inside every larger
    ball, so a point rejected in it is rejected in those too (the attacks at the larger radii may miss it)."""
    clean = cpr(model, x)
    outer = ~clean.rejected & (clean.pred != y)                              # x itself: accepted and wrong
    for attack in attacks:                                                   # the base model's attacks
        x_adv = attack(model, x, y).x_adv
        r = cpr(model, x_adv)
        outer |= ~r.rejected & (r.pred != y)
    outer |= outer_attack(model, cpr, x, y, eps=eps, steps=steps, restarts=restarts, targets=targets,
                          generator=generator)
    inner, found = {}, clean.rejected.clone()
    for a in sorted(alphas):   # the balls are nested: a rejection found within a smaller one counts in every larger
        if a > 0:
            found = found | inner_attack(model, cpr, x, y, eps0=a * eps, steps=steps, restarts=restarts,
                                         generator=generator)
        inner[a] = found.clone()
    to_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return {"clean_correct": to_np(clean.pred == y), "clean_rejected": to_np(clean.rejected),
            "outer_error": to_np(outer), "inner_rejected": {a: to_np(v) for a, v in inner.items()}}


def run_reject(model: str | Path, dataset: str = "mnist5k", *, eps: float | str, norm: str = "linf",
               preset: str | None = "mnist", eps_rej: float | str | None = None, rej_steps: int | None = None,
               rej_step_size: float | None = None, alphas: Sequence[float] = ALPHAS,
               attack: Sequence[str] = ("pgd",), attack_params: Mapping[str, Any] | None = None, steps: int = 20,
               restarts: int = 1, targets: int | None = None, split: str = "test", n: int | None = 100,
               batch_size: int = 100,
               out: str | Path | None = None, device: torch.device | str = "cpu", seed: int = 0,
               data_root: str | None = None, download: bool = False,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` with CPR rejection; with ``out`` write ``results.json``, ``report.md`` and
    ``plots/robustness_curve.png``. ``targets``: target classes of the BPDA outer attack (``None``: every wrong
    class, as the code). Everything is validated before anything runs or is written."""
    eps_f, norm = parse_eps(eps), parse_norm(norm)
    if out:
        check_output_dir(out)
    alphas = _alphas(alphas)
    cpr = CPR(preset=preset, norm=norm, eps_rej=eps_rej, steps=rej_steps, step_size=rej_step_size)
    attacks = [build_attack(a, attack_params, norm=norm, eps=eps_f, seed=seed) for a in attack]
    if steps < 0 or restarts < 1 or (targets is not None and targets < 0):
        raise InputError(f"steps and targets must be >= 0 and restarts >= 1, got steps {steps}, restarts "
                         f"{restarts}, targets {targets}")
    net = load(Path(model), map_location=device)
    loader = make_loader(dataset, split, batch_size=batch_size, n=n, data_root=data_root, download=download,
                         device=device)
    check_compatible(net, loader.info)
    targets = net.num_classes - 1 if targets is None else min(targets, net.num_classes - 1)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    t0, parts = time.perf_counter(), []
    for i, (x, y) in enumerate(loader):
        parts.append(evaluate_batch(net, cpr, x, y, eps=eps_f, alphas=alphas, attacks=attacks, steps=steps,
                                    restarts=restarts, targets=targets, generator=gen))
        if log:
            log(f"batch {i + 1}/{len(loader)}")
    cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
    clean_ok, clean_rej = cat("clean_correct"), cat("clean_rejected")
    metrics = stratified_accuracy(cat("outer_error"), {a: np.concatenate([p["inner_rejected"][a] for p in parts])
                                                        for a in alphas})
    acc = clean_ok & ~clean_rej
    res = {"model": str(model), "arch": net.arch, "dataset": dataset, "split": split, "n": int(clean_ok.size),
           "norm": norm, "eps": eps_f, "rejector": cpr.params(), "attacks": list(attack), "steps": steps,
           "restarts": restarts, "targets": targets, "clean_accuracy": float(clean_ok.mean()),
           "clean_rejection_rate": float(clean_rej.mean()),
           "clean_accuracy_on_accepted": float(acc.sum() / max(int((~clean_rej).sum()), 1)),
           **metrics, "seconds": time.perf_counter() - t0}
    if out:
        write_results(out, res)
        write_markdown(out, report(res))
        line_plot(Path(out) / "plots" / "robustness_curve.png",
                  {f"CPR eps_rej={cpr.eps_rej:g}": ([c["alpha"] for c in res["curve"]],
                                                     [c["robust_accuracy"] for c in res["curve"]])},
                  xlabel="alpha (rejection within alpha * eps costs)", ylabel="robust accuracy with rejection",
                  title=f"{net.arch} on {dataset}, {norm} eps={eps_f:g}")
    return res


def report(res: Mapping[str, Any]) -> str:
    head = {k: res[k] for k in ("n", "eps", "clean_accuracy", "clean_rejection_rate", "clean_accuracy_on_accepted",
                                "robust_accuracy_with_rejection", "curve_auc")}
    return (f"# Selective classification with CPR (Chen et al. 2023)\n\nModel `{res['model']}` ({res['arch']}) on "
            f"{res['dataset']}/{res['split']}, {res['norm']} eps={res['eps']:g}, rejector {res['rejector']}, "
            f"outer attacks {', '.join(res['attacks'])} + BPDA (untargeted + {res['targets']} targets, "
            f"{res['steps']} steps, {res['restarts']} restart(s)).\n\n{md_table([head])}\n"
            f"## Robustness curve (rejection within alpha * eps costs)\n\n{md_table(res['curve'])}\n"
            "![robustness curve](plots/robustness_curve.png)\n")


def summary_lines(res: Mapping[str, Any]) -> list[str]:
    """The lines ``robustkit reject`` prints."""
    lines = [f"clean accuracy {res['clean_accuracy']:.4f}, rejected {res['clean_rejection_rate']:.4f}, accuracy on "
             f"accepted {res['clean_accuracy_on_accepted']:.4f} ({res['n']} images)",
             f"robust accuracy with rejection (eps={res['eps']:g}) {res['robust_accuracy_with_rejection']:.4f}"]
    lines += [f"  alpha={c['alpha']:<5g} rejected {c['rejection_rate']:.4f}  robust accuracy {c['robust_accuracy']:.4f}"
              for c in res["curve"]]
    lines.append(f"curve AUC {res['curve_auc']:.4f}")
    return lines
