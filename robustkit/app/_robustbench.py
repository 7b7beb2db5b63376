"""RobustBench ``model_info`` files: written for every benchmark entry, read back as reported rows.

RobustBench (Croce et al. 2021, "RobustBench: a standardized adversarial robustness benchmark",
NeurIPS Datasets and Benchmarks) keeps one JSON per model in ``model_info/<dataset>/<Linf|L2>/<id>.json``:
``link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture, eps,
clean_acc, reported, autoattack_acc`` (+ optional ``external``, ``footnote``, ``unreliable``).
Accuracies and eps are strings (``"86.86"`` percent, ``"8/255"``), ``additional_data`` and
``unreliable`` JSON booleans, ``number_forward_passes`` an integer; unknown ``authors`` / ``reported``
are ``""``, a paper-less model's ``venue`` is ``"N/A"`` (their ``Standard.json``), and their own
writer (``robustbench.utils.update_json``) leaves other unknowns ``null``.

Writing (``model_info``): ``autoattack_acc`` is only ever *standard* AutoAttack (version
``standard``, no overrides, the whole test set), the one number RobustBench ranks by. Any other run
omits it and says in ``footnote`` exactly what ran; our number goes to ``robustkit.autoattack_acc``.
The threat model, which RobustBench keeps in the folder name, is the extra key ``threat_model``.

Reading (``reported_entries``): a ``.json`` item of ``--models`` is taken as reported, never
re-evaluated. Another dataset or threat model is an ``InputError`` (not comparable); another or an
unstated eps, an unstated threat model, a non-standard AutoAttack number or RobustBench's
``unreliable`` become flags on the row (RobustBench itself footnotes eps = 0.031 vs 8/255).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustkit import __version__
from robustkit.errors import InputError
from robustkit.io import atomic_write_json
from robustkit.threat import parse_eps

KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
        "eps", "clean_acc", "reported", "autoattack_acc")
THREAT = {"linf": "Linf", "l2": "L2"}                       # ours -> RobustBench's folder names
RB_THREATS = ("Linf", "L2", "corruptions", "corruptions_3d")
# full test-set sizes: standard AutoAttack means all of them (RobustBench: all 10,000 CIFAR images)
TEST_SIZES = {"mnist5k": 1000, "mnist": 10000, "fashion-mnist": 10000, "cifar10": 10000, "cifar100": 10000,
              "svhn": 26032}
STATUS = "reported, not evaluated here"


def eps_string(eps: float) -> str:
    """RobustBench's eps text: ``"0.3"``, ``"0.031"`` as written, ``"8/255"`` for k/255 values."""
    short = f"{eps:g}"
    if float(short) == eps:
        return short
    k = eps * 255
    if round(k) > 0 and abs(k - round(k)) < 1e-9:
        return f"{round(k)}/255"
    return repr(eps)


def percent(frac: float) -> str:
    """A fraction as RobustBench's percent string with 2 decimals: 0.8686 -> ``"86.86"``."""
    return f"{100 * frac:.2f}"


# -- writing ----------------------------------------------------------------------------------
def autoattack_run(entry: Mapping[str, Any], s: Mapping[str, Any]) -> tuple[bool, str]:
    """(whether the entry's AutoAttack is RobustBench's standard evaluation, what ran in words)."""
    aa = entry.get("autoattack")
    if aa is None:
        return False, "AutoAttack was not run"
    overrides = (s["attack_params"].get("autoattack") or {}).get("overrides") or {}
    n, dataset = entry["n"], s["dataset"]
    full = TEST_SIZES.get(dataset)
    standard = aa.get("version") == "standard" and not overrides and full is not None and n >= full
    what = f"AutoAttack version {aa.get('version')!r} ({', '.join(aa.get('attacks') or [])})"
    if overrides:
        what += " with overrides " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    what += f" via {aa.get('package')} {aa.get('package_version')} on "
    what += (f"all {n} test images" if full is not None and n >= full else
             f"the first {n} of the {full} test images" if full is not None else
             f"the first {n} test images of {dataset} (robustkit does not know its full test-set size)")
    return standard, what


def model_info(entry: Mapping[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    """One evaluated benchmark entry as a RobustBench ``model_info`` dict (key order as theirs)."""
    standard, what = autoattack_run(entry, s)
    d: dict[str, Any] = {
        "link": "", "name": entry["name"], "authors": "", "additional_data": None, "number_forward_passes": 1,
        "dataset": entry["dataset"], "venue": "N/A", "architecture": entry["architecture"],
        "eps": eps_string(entry["eps"]), "clean_acc": percent(entry["clean_acc"]), "reported": ""}
    ours = {"version": __version__, "n": entry["n"], "test_size": TEST_SIZES.get(s["dataset"]),
            "standard_autoattack": standard, "autoattack_run": what,
            "robust_acc": percent(entry["robust_acc"]), "attacks": list(entry["attacks"])}
    if "autoattack_acc" in entry:
        ours["autoattack_acc"] = percent(entry["autoattack_acc"])
    if standard:
        d["autoattack_acc"] = ours["autoattack_acc"]
    elif "autoattack_acc" in entry:
        d["footnote"] = (f"Not the standard AutoAttack evaluation, so no autoattack_acc: robustkit ran {what}: "
                         f"{ours['autoattack_acc']}% robust accuracy (robustkit.autoattack_acc).")
    else:
        d["footnote"] = ("AutoAttack was not run, so no autoattack_acc; robustkit's attacks "
                         f"({', '.join(entry['attacks'])}) leave {ours['robust_acc']}% (robustkit.robust_acc).")
    d["threat_model"] = entry["threat_model"]
    d["robustkit"] = ours
    return d


def write_model_infos(out: Path, entries: Sequence[Mapping[str, Any]], s: Mapping[str, Any]) -> list[Path]:
    """``out/robustbench/<name>.json`` for every evaluated entry (atomically)."""
    return [atomic_write_json(out / "robustbench" / f"{e['name']}.json", model_info(e, s)) for e in entries]


# -- reading ----------------------------------------------------------------------------------
def is_reported(item: object) -> bool:
    """A ``--models`` item naming a RobustBench ``model_info`` file (a path ending in ``.json``)."""
    return isinstance(item, (str, Path)) and str(item).lower().endswith(".json") and not Path(item).is_dir()


def reported_entries(models: Sequence[Any] | Mapping[str, Any], s: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reported rows of the ``.json`` items of ``models`` (others are skipped), checked against
    the benchmark settings ``s``; names unique (``Carmon2019Unlabeled``, ``x-2``, ...)."""
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    out: dict[str, dict[str, Any]] = {}
    for name, m in items:
        if not is_reported(m):
            continue
        base = re.sub(r"[^\w.+-]", "_", str(name or Path(m).stem))
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = read_model_info(Path(m), s, name)
    return list(out.values())


def read_model_info(path: Path, s: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One ``model_info`` file as a reported row; ``InputError`` naming the file for anything malformed."""
    def bad(problem: str) -> InputError:
        hint = " (a robustkit model's model.json? pass its directory instead)" if path.name == "model.json" else ""
        return InputError(f"RobustBench model_info file {path}: {problem}{hint}")

    if not path.is_file():
        raise bad("no such file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise bad(f"expected a JSON object with the keys {', '.join(KEYS)}, got a {type(d).__name__}")
    for key in ("name", "link", "authors", "venue", "architecture", "dataset", "footnote"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise bad(f"{key} must be a string, got {d[key]!r}")
    for key, types in (("additional_data", bool), ("unreliable", bool), ("number_forward_passes", int)):
        if d.get(key) is not None and (not isinstance(d[key], types) or (types is int and isinstance(d[key], bool))):
            raise bad(f"{key} must be a JSON {'boolean' if types is bool else 'integer'} or null, got {d[key]!r}")
    if not d.get("dataset"):
        raise bad("no dataset (RobustBench: cifar10, cifar100, imagenet)")
    if _key(d["dataset"]) != _key(s["dataset"]):
        raise bad(f"dataset {d['dataset']!r} is not this benchmark's {s['dataset']!r}; a leaderboard compares "
                  "one test set (pass --dataset to benchmark another)")
    flags: dict[str, str] = {}
    tm = d.get("threat_model") or (path.parent.name if path.parent.name in RB_THREATS else None)
    ours = THREAT[s["norm"]]
    if tm is None:
        flags["threat_model_unstated"] = (f"the file does not say its threat model (RobustBench keeps it in the "
                                          f"folder name model_info/<dataset>/<Linf|L2>/); taken as {ours}")
    elif str(tm).lower() != ours.lower():
        raise bad(f"threat model {tm} is not this benchmark's {ours}; {tm} and {ours} numbers are separate "
                  "leaderboards (pass --norm to benchmark another)")
    eps = None
    if d.get("eps") in (None, ""):
        flags["eps_unstated"] = f"the file does not state its eps; this benchmark's is {eps_string(s['eps'])}"
    else:
        try:
            eps = parse_eps(d["eps"])
        except InputError as e:
            raise bad(str(e)) from None
        if not math.isclose(eps, s["eps"], rel_tol=1e-6, abs_tol=1e-12):
            flags["eps_mismatch"] = f"reported at eps {d['eps']}, not this benchmark's {eps_string(s['eps'])}"
    e: dict[str, Any] = {"name": name, "evaluated": False, "status": STATUS, "source": str(path),
                         "title": d.get("name") or name, "link": d.get("link") or None,
                         "architecture": d.get("architecture") or "", "dataset": d["dataset"], "threat_model": tm,
                         "eps": eps, "clean_acc": _percent(d, "clean_acc", bad)}
    aa = _percent(d, "autoattack_acc", bad, required=False)
    if aa is None:
        extra = d.get("robustkit") if isinstance(d.get("robustkit"), dict) else {}
        aa = _percent(extra, "autoattack_acc", bad, required=False)
        if aa is None:
            raise bad("no autoattack_acc (RobustBench's robust accuracy under standard AutoAttack); only "
                      "adversarial-robustness entries can join this leaderboard")
        flags["non_standard_autoattack"] = d.get("footnote") or "robustkit.autoattack_acc: not standard AutoAttack"
    e["autoattack_acc"] = aa
    if (best := _percent(d, "external", bad, required=False)) is not None:
        e["best_known_acc"] = best
    if d.get("unreliable"):
        flags["unreliable"] = "RobustBench marks its AutoAttack evaluation as potentially unreliable"
    e.update(footnote=d.get("footnote"), flags=flags, model_info=d)
    return e


def _key(dataset: str) -> str:
    return re.sub(r"[-_ ]", "", str(dataset).lower())


def _percent(d: Mapping[str, Any], key: str, bad: Any, required: bool = True) -> float | None:
    """``d[key]``, a percent string like ``"86.86"`` (or a number), as a fraction in [0, 1]."""
    v = d.get(key)
    if v in (None, ""):
        if required:
            raise bad(f"no {key} (a percent string such as '86.86')")
        return None
    try:
        if isinstance(v, bool):
            raise ValueError
        p = float(v)
    except (TypeError, ValueError):
        raise bad(f"{key} must be a percent string such as '86.86', got {v!r}") from None
    if not 0.0 <= p <= 100.0:
        raise bad(f"{key} must be a percentage between 0 and 100, got {v!r}")
    return p / 100
