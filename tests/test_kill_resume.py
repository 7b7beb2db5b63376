"""A `kill -9` mid-training loses at most the work since the last checkpoint and never corrupts one:
`robustkit train --resume` then ends with exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["train", "--model", "ibp-small", "--dataset", "mnist5k", "--epochs", "3", "--eval-n", "50",
        "--checkpoint-every", "3", "--set", "data.n_train=1500", "--set", "eval.attack=null",
        "--set", "eval.best_by=clean_accuracy", "--device", "cpu", "--seed", "0"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "robustkit", *ARGS, "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref), check=True, env=_env(), capture_output=True, timeout=300)
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoints" / "last" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_mid_run = proc.returncode == -signal.SIGKILL
    # whatever the moment of the kill, the checkpoint on disk is complete and loadable
    st = torch.load(state, weights_only=True)
    assert st["step"] >= 3
    load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    subprocess.run(_cmd(run, "--resume"), check=True, env=_env(), capture_output=True, timeout=300)
    a = load_file(str(ref / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert killed_mid_run or st["epoch"] == 3
    print(f"killed mid-run: {killed_mid_run}, at step {st['step']} of epoch {st['epoch']}")
