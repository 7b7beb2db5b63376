"""Attacks from names and keyword arguments: the one builder behind ``robustkit attack``, the
benchmark and the per-epoch evaluation.

Two kinds of keyword arguments, two rules:

- ``params`` are what the user asked for. A key the attack does not take is a ``ConfigError``
  that lists the keys it does take; a required key nobody gave is named.
- the shared defaults (``norm``, ``eps``, ``seed``, ``amp``, ``batch_size``, ``log_dir``) describe
  the job, not one attack: each is passed only where the attack accepts it, and ``params``
  override them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustkit.errors import ConfigError, InputError
from robustkit.registry import ATTACKS, RegistryError


def attack_class(name: str) -> type:
    """The registered attack class ``name``; ``ConfigError`` listing the valid names otherwise."""
    import attacks  # noqa: F401  (registers every attack)

    try:
        return ATTACKS.get(name)
    except RegistryError as e:
        raise ConfigError(str(e)) from None


def attack_kwargs(cls: type) -> tuple[set[str], set[str], bool]:
    """``(accepted, required, takes_any)`` keyword arguments of ``cls.__init__`` (private ``_x`` excluded)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = {q.name for q in params if q.kind in kinds and not q.name.startswith("_")}
    required = {q.name for q in params if q.kind in kinds and q.default is inspect.Parameter.empty}
    return accepted, required, any(q.kind == inspect.Parameter.VAR_KEYWORD for q in params)


def build_attack(name: str, params: Mapping[str, Any] | None = None, *, norm: str | None = None,
                 eps: float | str | None = None, seed: int | None = None, amp: bool = False,
                 batch_size: int | None = None, log_dir: str | Path | None = None) -> Any:
    """The registered attack ``name`` built with ``params`` (strict) over the shared defaults.

    Raises ``ConfigError`` for an unknown attack (listing the valid ones), a key of ``params`` the
    attack does not take (listing the ones it takes), a required key not given, and a value the
    attack rejects.
    """
    cls = attack_class(name)
    accepted, required, any_kw = attack_kwargs(cls)
    params = dict(params or {})
    unknown = [] if any_kw else sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not accepted by attack {name!r}; valid keys: "
                          f"{', '.join(sorted(accepted))}")
    shared = {"norm": norm, "eps": eps, "seed": seed, "amp": True if amp else None, "batch_size": batch_size,
              "log_dir": None if log_dir is None else str(log_dir)}
    kw = {k: v for k, v in shared.items() if v is not None and (k in accepted or any_kw)}
    kw.update(params)
    missing = sorted(required - set(kw))
    if missing:
        raise ConfigError(f"attack {name!r} needs {', '.join(missing)} (required; valid keys: "
                          f"{', '.join(sorted(accepted))})")
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except InputError as e:          # the attack's own validation of a value
        raise ConfigError(f"attack {name!r}: {e}") from None


def build_chain(names: Sequence[str], params: Mapping[str, Any] | None = None, **shared: Any) -> list[Any]:
    """One attack per name; each key of ``params`` goes to every attack of the chain that accepts
    it, and a key that none accepts is a ``ConfigError`` naming what each one accepts."""
    sigs = [attack_kwargs(attack_class(n)) for n in names]
    params = dict(params or {})
    for key in params:
        if not any(key in acc or any_kw for acc, _, any_kw in sigs):
            valid = "; ".join(f"{n}: {', '.join(sorted(acc))}" for n, (acc, _, _) in zip(names, sigs))
            raise ConfigError(f"{key!r} is not accepted by attack {', '.join(names)} (valid keys: {valid})")
    return [build_attack(n, {k: v for k, v in params.items() if k in acc or any_kw}, **shared)
            for n, (acc, _, any_kw) in zip(names, sigs)]
