"""Flags shared by ``robustkit train`` and ``robustkit finetune``, mapped onto a ``TrainConfig``.

Precedence, lowest first: the dataclass defaults < the command's defaults (``base``) <
``--config`` YAML (or, with ``--resume`` and no ``--config``, the run's own ``config.yaml``)
< the dedicated flags (``--lr``, ``--defense``, ...) < ``--set key.path=value`` overrides.

Bring your own model: ``--arch package.module:ClassName`` (the module importable: installed or on
``PYTHONPATH``) with ``--arch-kwargs JSON`` (one JSON object, merged into ``model.kwargs``; JSON so
numbers, lists and booleans keep their types), ``--weights FILE`` (a plain state dict, read
without unpickling; ``--no-strict`` loads what matches and reports the rest) and
``--resize H[xW]`` (the network's input size; the resize runs inside the model).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from robustkit.config import TrainConfig, apply_overrides, from_dict, load_yaml, set_path
from robustkit.errors import ConfigError

# flag dest -> config key path (values copied when the flag is given)
_FLAGS: dict[str, str] = {
    "dataset": "data.name", "data_root": "data.root", "epochs": "epochs", "batch_size": "data.batch_size",
    "lr": "optim.lr", "optimizer": "optim.name", "schedule": "schedule.name", "defense": "defense.name",
    "weight_perturbation": "defense.weight_perturbation", "eval_n": "eval.n", "arch": "model.arch",
    "model": "model.pretrained", "checkpoint_every": "checkpoint_every", "resize": "model.resize",
    "strict": "model.strict",
}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def add_train_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    """Add the training flags. Call ``_common.add_common(p)`` too (``--device``, ``--seed``)."""
    p.add_argument("--config", default=None, help="YAML recipe (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.weight_decay=2e-4 (repeatable)")
    p.add_argument("--model", required=model_required, default=None, metavar="PRETRAINED",
                   help="start from these weights: a run directory, a model directory (model.json + "
                        "model.safetensors), a .pt/.pth/.safetensors state dict (needs --arch), or a timm / "
                        "tv: model name whose pretrained weights are in the local cache")
    p.add_argument("--arch", default=None, help="architecture: a built-in / timm / tv:NAME model (robustkit models) "
                                                "or your own nn.Module class as package.module:ClassName; "
                                                "required for a plain state dict")
    p.add_argument("--arch-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the architecture as one JSON object, e.g. '{\"width\": 16}' "
                        "(merged into model.kwargs)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="start from this plain state dict (.pt/.pth/.bin via torch.load(weights_only=True), or "
                        ".safetensors) loaded into --arch; same as --model FILE")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="a state dict must match the model key for key (default); --no-strict loads the keys that "
                        "match by name and shape and reports the skipped ones (e.g. a new head)")
    p.add_argument("--resize", default=None, metavar="H[xW]",
                   help="run the network at this input size (e.g. 224 for ImageNet nets on 32x32 data); the resize "
                        "is inside the model, so attacks and certificates see the data's pixels")
    p.add_argument("--dataset", default=None, help="dataset name (robustkit datasets)")
    p.add_argument("--data-root", default=None, help="where torchvision datasets live")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"])
    p.add_argument("--schedule", default=None, help="LR schedule: constant, cosine, step, linear, "
                                                     "slow-start-fast-decay, cyclic")
    p.add_argument("--defense", default=None, help="training objective (robustkit DEFENSES: standard, pgd-at, "
                                                    "trades, mart, ...)")
    p.add_argument("--weight-perturbation", default=None, choices=["awp", "rwp", "sam", "amp"],
                   help="wrap the objective in a weight-perturbation rule (AWP, RWP, SAM, AMP)")
    p.add_argument("--eps", default=None, help="defense radius, e.g. 0.3 or 8/255 (also the evaluation eps)")
    p.add_argument("--beta", type=float, default=None, help="defense.params.beta (TRADES / MART)")
    p.add_argument("--eval-n", type=int, default=None, help="test images evaluated after each epoch")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision on CUDA")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    p.set_defaults(seed=None)  # so a YAML seed is not overridden by add_common's default


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """The validated ``TrainConfig`` of the parsed flags (see the module docstring for precedence).

    Also sets ``args.seed`` to the config's seed when ``--seed`` was not given.
    """
    data = _merge({}, base or {})
    own = Path(args.out) / "config.yaml"
    if args.config:
        _merge(data, load_yaml(args.config))
    elif getattr(args, "resume", False) and own.is_file():
        _merge(data, load_yaml(own))
    _weights_flag(args)
    for dest, path in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_path(data, path, value)
    if getattr(args, "arch_kwargs", None) is not None:
        data.setdefault("model", {}).setdefault("kwargs", {}).update(_json_object(args.arch_kwargs))
    if args.eps is not None:
        set_path(data, "defense.params.eps", str(args.eps))
        set_path(data, "eval.eps", str(args.eps))
    if args.beta is not None:
        set_path(data, "defense.params.beta", args.beta)
    for flag in ("amp", "channels_last"):
        if getattr(args, flag, None):
            data[flag] = True
    if getattr(args, "seed", None) is not None:
        data["seed"] = args.seed
    apply_overrides(data, list(getattr(args, "set", None) or []))
    cfg = from_dict(TrainConfig, data)
    args.seed = cfg.seed
    return cfg


def _weights_flag(args: argparse.Namespace) -> None:
    """``--weights FILE`` is ``--model FILE`` for a plain state-dict file (checked here: one clear error)."""
    w = getattr(args, "weights", None)
    if w is None:
        return
    if getattr(args, "model", None):
        raise ConfigError(f"give either --weights {w} or --model {args.model}, not both")
    p = Path(w)
    if not p.is_file() or p.suffix not in STATE_DICT_SUFFIXES:
        raise ConfigError(f"--weights {w}: expected an existing state-dict file ({', '.join(STATE_DICT_SUFFIXES)}); "
                          "for a robustkit model or run directory use --model")
    args.model = w


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--arch-kwargs: not valid JSON ({e}); e.g. --arch-kwargs '{{\"width\": 16}}'") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--arch-kwargs: expected a JSON object of keyword arguments, got {text!r}")
    return obj


def summary(verb: str, cfg: TrainConfig, run: Any) -> str:  # run: robustkit.runs.RunDir
    """The one line printed after training: what, how long, the last epoch's accuracies, where."""
    metrics = run.metrics()
    final = metrics[-1] if metrics else {}
    accs = ", ".join(f"{k} {final[k]:.4f}" for k in ("clean_accuracy", "robust_accuracy") if k in final)
    wp = f" + {cfg.defense.weight_perturbation}" if cfg.defense.weight_perturbation else ""
    return (f"{verb} {cfg.model.arch or cfg.model.pretrained} with {cfg.defense.name}{wp} for {cfg.epochs} epochs"
            f"{': ' + accs if accs else ''}. Run: {run.path}")
