"""The benchmark modules: every one is listed in ``benchmarks.MODULES`` and in the Makefile's ``BENCH``
(so ``make bench`` runs all of them), imports as a module without shadowing the top-level packages,
and takes ``--quick``. The ``slow`` test runs each with ``--quick`` and checks its results JSON."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture()
def benchmarks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))          # as `python -m benchmarks.X` from the root does
    return importlib.import_module("benchmarks")


def _make_list(var: str) -> list[str]:
    m = re.search(rf"^{var} := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {var} list"
    return m.group(1).split()


def test_every_benchmark_is_listed_and_run_by_make(benchmarks) -> None:
    assert len(NAMES) >= 7
    assert sorted(benchmarks.MODULES) == NAMES
    assert sorted(_make_list("BENCH")) == NAMES
    assert set(_make_list("BENCH_GPU")) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_module_imports_and_takes_quick(benchmarks, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    mod = importlib.import_module(f"benchmarks.{name}")
    for pkg in ("attacks", "certify", "defenses"):                # the packages, not benchmark files
        assert Path(importlib.import_module(pkg).__file__).parent.name == pkg
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m benchmarks.{name}" in text and "--quick" in text and "--out" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_results(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)], cwd=ROOT,
                   check=True, timeout=900)
    res = json.loads(out.read_text())
    assert res["benchmark"] == name and res["quick"] is True
    assert {"cpu", "cpu_count", "torch_threads", "device", "versions"} <= set(res["machine"])
