"""``run_attack``: one model under a registered attack or a chain, on the evaluation engine.

Per eps value (several give a robustness curve) the chain runs through
``robustkit.evaluate.evaluate_attacks`` -- chained by default (AutoAttack-style: each attack only
on the points still standing), every claimed success verified. Writes ``results.json`` and
``report.md`` and ``per_image.json`` to ``out`` (plus ``plots/robustness_curve.png`` for curves,
``plots/success_vs_queries.png`` for query-budgeted attacks, and ``adversarials.safetensors`` /
``plots/adversarials.png`` with ``save_adversarials``).

Under ``torchrun`` the selected images are cut into fixed batches of ``batch_size`` that are
shared out over the processes (``robustkit.app.sharded_eval``): per image the results are those
of one process, whatever the number of processes. Each batch's record is saved under
``out/parts/eps-<i>/`` the moment it is done; ``resume`` computes only the batches missing
there. Only rank 0 writes the results.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from robustkit.app import _attack_report as rep
from robustkit.app.build import build_chain
from robustkit.app.shard import check_enough, setup
from robustkit.app.sharded_eval import check_output_dir, evaluate_sharded
from robustkit.config import AttackConfig, to_dict
from robustkit.data import dataset_info, make_loader
from robustkit.device import seed_everything
from robustkit.errors import ConfigError, InputError
from robustkit.evaluate import predict
from robustkit.report import md_table, write_markdown, write_results
from robustkit.zoo import check_compatible, load

PARTS = "parts"                  # per-batch progress files, one folder per eps value (out/parts/eps-<i>)


def run_attack(cfg: AttackConfig, device: torch.device | str, progress: bool | None = None,
               log: Callable[[str], None] = lambda m: None,
               warn: Callable[[str], None] = lambda m: None, resume: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.model`` under ``cfg.attack`` at each ``cfg.eps``; returns ``results.json``'s
    dict (plus ``out``, the directory written), on every rank under torchrun.

    Every user error (unknown attack or key, missing eps, incompatible model, an output path that
    cannot be a directory, more processes than images) is raised before any work or any file is
    written. ``log`` receives one line per eps value, ``warn`` each sanity warning (before the
    attacks run; rank 0 only); ``progress``: bars (default: when stderr is a terminal).
    ``resume``: keep the batches already in ``out/parts`` (made with the same settings).
    """
    if not cfg.model:
        raise ConfigError("model: required (a run or model directory; --model DIR)")
    eps_values: list[float | None] = list(cfg.eps_values) if cfg.eps_values is not None else [None]
    chains = [build_chain(cfg.attack, cfg.params, norm=cfg.norm, eps=e, seed=cfg.seed, amp=cfg.amp)
              for e in eps_values]
    out = Path(cfg.out or f"runs/attack-{'+'.join(cfg.attack)}")
    check_output_dir(out)
    w, device = setup(device)                      # under torchrun: this rank's GPU, the process group
    seed_everything(cfg.seed)
    model = load(Path(cfg.model), map_location=device)
    check_compatible(model, dataset_info(cfg.dataset))
    x, y = selected_images(cfg)                                                # (N, C, H, W), (N,) on CPU
    check_enough(x.shape[0], "images")
    checks = _sanity(model, x[:cfg.batch_size].to(device), y[:cfg.batch_size].to(device))
    if not w.is_main:
        log, warn = (lambda m: None), (lambda m: None)
    for c in checks:
        warn(c)
    show = sys.stderr.isatty() if progress is None else progress
    name = "+".join(cfg.attack)
    results = []
    for i, (chain, e) in enumerate(zip(chains, cfg.eps or [None])):
        keep = cfg.save_adversarials and i == len(chains) - 1
        key = {"dataset": cfg.dataset, "split": cfg.split, "eps": e}
        r = evaluate_sharded(model, x, y, chain, batch_size=cfg.batch_size, mode=cfg.mode,
                             store_dir=out / PARTS / f"eps-{i}", resume=resume, key=key, seed=cfg.seed, amp=cfg.amp,
                             keep_adversarials=keep, progress=show, desc=name).summary()
        if keep and w.is_main:
            r["pred_adv"] = predict(model, r["x_adv"], amp=cfg.amp)
        results.append(r)
        log(f"{name}" + (f" eps={e}" if e is not None else "") + f": clean {r['clean_accuracy']:.4f}  "
            f"robust {r['robust_accuracy']:.4f}  ({r['seconds']:.1f}s)"
            + (f"  [{r['unverified']} unverified claims not counted]" if r["unverified"] else ""))
    res = _summary(cfg, chains, results, checks)
    res["processes"] = w.size
    if not w.is_main:
        res["out"] = str(out)
        return res
    md = [f"# Attack: {name}\n", f"model `{cfg.model}` ({model.arch}), {cfg.dataset}/{cfg.split}, n={res['n']}, "
          f"{cfg.mode}; every claimed success verified (label and ball), {res['unverified']} claims rejected\n",
          md_table([{k: res[k] for k in ("attack", "norm", "eps", "n", "clean_accuracy", "robust_accuracy",
                                         "seconds") if not isinstance(res[k], list)}])]
    md += [f"\n## Attacks ({cfg.mode})\n", md_table(results[-1]["per_attack"])]
    if len(eps_values) > 1:
        md += rep.curve_section(out, res, name)
    if any(getattr(a, "max_queries", None) is not None for a in chains[-1]):
        md += rep.queries_section(out, res, results[-1], chains[-1])
    if cfg.save_adversarials:
        md += rep.save_adversarials(out, results[-1], res)
    if checks:
        md += ["\n## Sanity warnings\n"] + [f"- {w}\n" for w in checks]
    write_results(out, res)
    rep.per_image(out, list(cfg.eps or [None]), results)
    write_markdown(out, "\n".join(md))
    res["out"] = str(out)
    return res


def selected_images(cfg: AttackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``cfg`` selects, in the order and form its loader yields them (the first
    ``n``; the train split shuffled and augmented as for training, seeded): ``(N, C, H, W)``
    in ``[0, 1]`` and ``(N,)`` on CPU."""
    loader = make_loader(cfg.dataset, cfg.split, batch_size=cfg.batch_size, n=cfg.n, data_root=cfg.data_root,
                         download=cfg.download)
    batches = list(loader)
    if not batches:
        raise InputError(f"{cfg.dataset}/{cfg.split} has no images")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _sanity(model: torch.nn.Module, x0: torch.Tensor, y0: torch.Tensor) -> list[str]:
    """AutoAttack-style sanity checks on the first batch (train mode, softmax outputs, masking)."""
    from attacks.sanity import sanity_checks

    with warnings.catch_warnings(record=True):
        return sanity_checks(model, x0, y0, warn=False)


def _summary(cfg: AttackConfig, chains: list[list[Any]], results: list[dict[str, Any]], checks: list[str]
             ) -> dict[str, Any]:
    curve = cfg.eps is not None and len(cfg.eps) > 1
    last = results[-1]
    values = cfg.eps_values
    keys = ("attack_success_rate", "mean_l2", "median_l2", "mean_linf", "forward_passes", "backward_passes")
    res: dict[str, Any] = {
        "command": "attack", "model": str(cfg.model), "dataset": cfg.dataset, "split": cfg.split,
        "attack": ",".join(cfg.attack), "mode": cfg.mode, "norm": getattr(chains[-1][0], "norm", None),
        "eps": (values if curve else values[0]) if values else None,
        "n": last["n"], "clean_accuracy": last["clean_accuracy"],
        "robust_accuracy": [r["robust_accuracy"] for r in results] if curve else last["robust_accuracy"],
        "seconds": sum(r["seconds"] for r in results), "unverified": sum(r["unverified"] for r in results),
        "params": [a.params() for a in chains[-1]],
        **{k: last[k] for k in keys}, "per_attack": last["per_attack"],
        "warnings": checks, "seed": cfg.seed, "config": to_dict(cfg),
    }
    if curve:
        res["curve"] = [{"eps": v, "eps_str": s, "robust_accuracy": r["robust_accuracy"],
                         "attack_success_rate": r["attack_success_rate"], "mean_l2": r["mean_l2"],
                         "mean_linf": r["mean_linf"], "unverified": r["unverified"], "seconds": r["seconds"]}
                        for s, v, r in zip(cfg.eps, values, results)]
    return res
