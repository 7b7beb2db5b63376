"""Mixed classifiers (adaptive smoothing, Bai et al. 2024): build one from two trained models.

The modules and the ``mix`` architecture live in ``robustkit._mixnet`` (see its docstring for the paper, the
formula and where we follow or leave the official code); this module combines two saved ``RobustModel``s::

    from robustkit.mix import mix_model
    model = mix_model(load("runs/std"), load("runs/trades"), alpha=0.5)        # a RobustModel, arch "mix"
    save(model, "models/mix")                                                  # loads like any other model
"""

from __future__ import annotations

from typing import Any

from torch import nn

from robustkit._mixnet import MEMBER_KEYS, Member, MixedNet, MixingNet
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, create, unwrap

__all__ = ["Member", "MixedNet", "MixingNet", "member_spec", "mix_model", "mixed_part"]


def member_spec(model: RobustModel) -> dict[str, Any]:
    """The part of a ``RobustModel``'s ``spec()`` a ``mix`` member needs."""
    spec = model.spec()
    return {k: spec[k] for k in MEMBER_KEYS if spec.get(k) not in (None, {})}


def mix_model(standard: nn.Module, robust: nn.Module, *, alpha: float | None = 0.5, mixing_net: bool = False,
              **options: Any) -> RobustModel:
    """The ``mix`` composite of two trained ``RobustModel``s (same classes and input shape); their weights are
    copied. ``options``: ``std_layer``, ``rob_layer``, ``width``, ``alpha_min``, ``alpha_max``, ``gamma_scale``,
    ``gamma_bias``, ``std_scale``, ``rob_scale`` (see ``MixedNet``). Returns a ``RobustModel`` in eval mode."""
    std, rob = unwrap(standard), unwrap(robust)
    if not (isinstance(std, RobustModel) and isinstance(rob, RobustModel)):
        raise InputError("mix_model takes two RobustModels (load them with robustkit.zoo.load)")
    if std.num_classes != rob.num_classes or std.input_shape != rob.input_shape:
        raise InputError(f"mix: the members must share classes and input shape, got {std.num_classes} classes "
                         f"{std.input_shape} (standard) and {rob.num_classes} classes {rob.input_shape} (robust)")
    if isinstance(std.net, MixedNet) or isinstance(rob.net, MixedNet):
        raise InputError("mix: a member cannot itself be a mix composite")
    kw = {"standard": member_spec(std), "robust": member_spec(rob), "alpha": None if mixing_net else alpha,
          "mixing_net": bool(mixing_net), **options}
    model = create("mix", std.num_classes, std.input_shape, **kw)
    model.net.standard.load_state_dict(std.state_dict())
    model.net.robust.load_state_dict(rob.state_dict())
    return model.to(next(std.parameters()).device).eval()


def mixed_part(model: nn.Module) -> MixedNet | None:
    """The ``MixedNet`` inside ``model`` (a ``RobustModel``, maybe DDP-wrapped), or None."""
    net = getattr(unwrap(model), "net", None)
    return net if isinstance(net, MixedNet) else None
