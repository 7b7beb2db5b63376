"""Launch ``robustkit`` commands under ``torchrun`` from tests (CPU, gloo), and kill one rank.

``python -m torch.distributed.run --standalone`` picks a free rendezvous port, so tests (and
several test runs on one box) never collide. Every process runs one torch thread. The ``--``
before the robustkit arguments keeps torchrun's own parser off them (without it, robustkit's
``--n`` is taken for an abbreviation of torchrun's ``--nnodes`` / ``--nproc-per-node``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("ROBUSTKIT_DEBUG", None)
    return env


def torchrun_argv(argv: Sequence[str], nproc: int = 2) -> list[str]:
    """The command line of ``torchrun --standalone --nproc_per_node=N -m robustkit -- ARGV``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "robustkit", "--", *argv]


def robustkit(argv: Sequence[str], nproc: int = 1, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``robustkit ARGV`` in ``nproc`` processes (``nproc == 1``: plain ``python -m robustkit``)."""
    cmd = torchrun_argv(argv, nproc) if nproc > 1 else [sys.executable, "-m", "robustkit", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))


def run_script(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300) -> None:
    """Run a test file as a torchrun worker script (``torchrun --standalone ... SCRIPT ARGS``) from the
    repository root, with the root on ``PYTHONPATH`` (the workers import ``tests.*``); fails the test
    with the output's tails unless every rank exits 0."""
    root = str(Path(__file__).resolve().parents[1])
    env = _env({"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def kill_one_rank_when(argv: Sequence[str], ready: Callable[[], bool], nproc: int = 2, timeout: float = 300
                       ) -> subprocess.CompletedProcess[str]:
    """Start ``robustkit ARGV`` under torchrun, ``SIGKILL`` one worker as soon as ``ready()`` holds
    (e.g. some progress files exist), and wait for torchrun to stop the rest."""
    proc = subprocess.Popen(torchrun_argv(argv, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env())
    t0 = time.monotonic()
    killed = False
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if not killed and ready():
            workers = _children(proc.pid)
            if workers:
                os.kill(max(workers), signal.SIGKILL)
                killed = True
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate()
    if not killed:
        raise AssertionError(f"the run ended before a rank could be killed:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_then_resume(argv: Sequence[str], out: Path, parts: Path, units: int, after: int = 3) -> None:
    """The kill-one-rank check shared by the sharded commands: run ``robustkit ARGV --out OUT`` on 2
    processes, SIGKILL a rank once ``after`` progress files exist under ``parts``, then rerun with
    ``--resume``; asserts the killed run wrote no results, the resumed one succeeded, every unit
    saved before the kill is untouched (not recomputed) and all ``units`` exist at the end."""
    run = kill_one_rank_when([*argv, "--out", str(out)], lambda: len(list(parts.glob("unit-*.json"))) >= after)
    assert run.returncode != 0 and not (out / "results.json").exists()
    before = {f.name: f.read_text() for f in parts.glob("unit-*.json")}
    assert after <= len(before) < units
    r = robustkit([*argv, "--out", str(out), "--resume"], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name, text in before.items():                                   # saved units were not recomputed
        assert (parts / name).read_text() == text
    assert len(list(parts.glob("unit-*.json"))) == units
