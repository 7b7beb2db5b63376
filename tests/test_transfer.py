"""Transferability: LGV collection (``robustkit.app.lgv``) through the Trainer at a constant LR, the
LGV attack (``attacks.lgv``) on a one-model collection follows PGD's trajectory, the transfer matrix
(``robustkit.app._bench_transfer``) has each model's white-box success on its diagonal, and the
benchmark / CLI paths on mnist5k with tiny models; bad input -> one clear error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import robustkit.app.benchmark as bm
from attacks.ensemble import ModelCollection
from attacks.lgv import LGV
from attacks.pgd import PGD
from robustkit.app._bench_transfer import transfer_matrix
from robustkit.app.lgv import collect_lgv, load_collection
from robustkit.cli import main
from robustkit.errors import CheckpointError, InputError
from robustkit.evaluate import evaluate_attacks
from robustkit.threat import ThreatModel
from robustkit.zoo import RobustModel, load, save

LGV_KW: dict[str, Any] = {"epochs": 2, "per_epoch": 2, "n_train": 256, "batch_size": 64, "progress": False}


def perturbed(model: RobustModel, seed: int, scale: float = 0.2) -> RobustModel:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return other


@pytest.fixture(scope="module")
def collection(tiny_mnist_model: RobustModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("lgv")
    src = save(tiny_mnist_model, root / "source")
    rec = collect_lgv(src, root / "lgv", lr=0.05, **LGV_KW)
    return root / "lgv", rec, src


def test_collects_k_snapshots_at_a_constant_lr(collection: Any, tiny_mnist_model: RobustModel) -> None:
    out, rec, src = collection
    assert rec["members"] == [f"lgv-{i:02d}" for i in range(4)]              # epochs x per_epoch
    assert rec["lr_per_epoch"] == [0.05, 0.05] and rec["settings"]["schedule"] == "constant"
    assert json.loads((out / "collection.json").read_text())["members"] == rec["members"]
    snaps = [load(out / m) for m in rec["members"]]                            # normal model directories
    source = load(src)
    flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in [source, *snaps]]
    assert all(not torch.equal(a, b) for a, b in zip(flat, flat[1:]))          # every snapshot moved on
    assert torch.equal(torch.cat([p.flatten() for p in tiny_mnist_model.parameters()]), flat[0])  # source unchanged
    coll = load_collection(out)
    assert isinstance(coll, ModelCollection) and len(coll) == 4 and coll.num_classes == 10
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(coll(x), torch.stack([m(x) for m in snaps]).mean(0), atol=1e-6)


def test_snapshot_positions_follow_the_trainer_steps(tiny_mnist_model: RobustModel, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """4 batches per epoch, 2 snapshots: saved after batches 2 and 4 (evenly spaced, the last at the
    epoch's end), each once."""
    import robustkit.app.lgv as lgv

    seen: list[str] = []
    real = lgv.save

    def spy(model: RobustModel, path: Path) -> Path:
        seen.append(Path(path).name)
        return real(model, path)

    monkeypatch.setattr(lgv, "save", spy)
    rec = collect_lgv(tiny_mnist_model, tmp_path / "c", epochs=1, per_epoch=2, n_train=256, batch_size=64,
                      progress=False)
    assert seen == rec["members"] == ["lgv-00", "lgv-01"]
    assert lgv.snapshot_steps(4, 2) == {2, 4} and lgv.snapshot_steps(19, 4) == {5, 10, 14, 19}


def test_lgv_on_one_model_follows_pgd(tiny_mnist_model: RobustModel, mnist_test_batch: Any) -> None:
    """Our PGD keeps the first iterate that fools the model; LGV runs on. Up to that step the two
    trajectories are the same: PGD's result is LGV's iterate at the first step where it fools."""
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    kw: dict[str, Any] = {"norm": "linf", "eps": 0.1, "step_size": 0.01}
    steps = 12
    pgd = PGD(steps=steps, random_start=False, loss="ce", **kw)(tiny_mnist_model, x, y)
    one = ModelCollection([tiny_mnist_model])
    iterates = [LGV(steps=s, **kw)(one, x, y) for s in range(steps + 1)]      # LGV's iterate after s steps
    assert torch.equal(iterates[-1].x_adv, LGV(steps=steps, **kw)(tiny_mnist_model, x, y).x_adv)
    assert bool(pgd.success.any())
    for i in range(x.shape[0]):
        fooled = [s for s in range(steps + 1) if bool(iterates[s].success[i])]
        if fooled:
            assert bool(pgd.success[i])
            assert torch.allclose(pgd.x_adv[i], iterates[fooled[0]].x_adv[i], atol=1e-6)
        else:
            assert not bool(pgd.success[i])
    # cycling over copies of one model is the same attack; two different members are not
    twin = LGV(steps=4, **kw)(ModelCollection([tiny_mnist_model, copy.deepcopy(tiny_mnist_model)]), x, y)
    assert torch.allclose(twin.x_adv, iterates[4].x_adv, atol=1e-6)
    mixed = LGV(steps=4, **kw)(ModelCollection([tiny_mnist_model, perturbed(tiny_mnist_model, 3, 1.0)]), x, y)
    assert not torch.allclose(mixed.x_adv, iterates[4].x_adv)
    assert bool(ThreatModel("linf", 0.1).contains(mixed.x_adv, x).all())


def test_matrix_diagonal_is_white_box_success(tiny_mnist_model: RobustModel, mnist_test_batch: Any) -> None:
    x, y = mnist_test_batch
    models = {"a": tiny_mnist_model, "b": perturbed(tiny_mnist_model, 1)}
    tm = transfer_matrix(models, models, x, y, norm="linf", eps=0.1, steps=10, batch_size=16)
    assert tm["sources"] == tm["targets"] == ["a", "b"] and tm["unverified"] == {"a": 0, "b": 0}
    for i, (name, model) in enumerate(models.items()):
        ev = evaluate_attacks(model, (x, y), LGV(norm="linf", eps=0.1, steps=10), mode="independent",
                              threat=ThreatModel("linf", 0.1), batch_size=16)
        white_box = int(ev.broken[0].sum()) / int(ev.clean_correct.sum())
        assert tm["success"][i][i] == pytest.approx(white_box)
        assert tm["clean_correct"][name] == int(ev.clean_correct.sum())
    assert all(0.0 <= v <= 1.0 for row in tm["success"] for v in row)
    with pytest.raises(InputError, match="at least one source"):
        transfer_matrix({}, models, x, y, norm="linf", eps=0.1)


def test_benchmark_transfer_matrix(collection: Any, tiny_mnist_model: RobustModel, tmp_path: Path) -> None:
    out_lgv, _, src = collection
    other = save(perturbed(tiny_mnist_model, 2), tmp_path / "other")
    out = tmp_path / "bench"
    kw: dict[str, Any] = {"n": 24, "eps": 0.1, "attacks": ["pgd"], "eps_grid": [], "progress": False,
                          "attack_params": {"pgd": {"steps": 3, "restarts": 1}},
                          "transfer": {"steps": 5, "sources": [str(out_lgv)]}}
    res = bm.run_benchmark([src, other], out, **kw)
    tm = res["transfer_matrix"]
    assert tm["sources"] == ["source", "other", "lgv:lgv"] and tm["targets"] == ["source", "other"]
    assert len(tm["success"]) == 3 and all(len(r) == 2 for r in tm["success"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["transfer_matrix"]["success"] == tm["success"]
    assert on_disk["settings"]["transfer"]["sources"] == [str(out_lgv)]
    assert (out / "plots" / "transfer_matrix.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Transferability" in report and "| lgv:lgv |" in report and "transfer_matrix.png" in report
    stamp = (out / "transfer.json").stat().st_mtime_ns
    again = bm.run_benchmark([src, other], out, **kw)                          # same settings and weights: reused
    assert again["transfer_matrix"] == tm and (out / "transfer.json").stat().st_mtime_ns == stamp


def test_cli_lgv_and_benchmark(tiny_mnist_model: RobustModel, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    src = save(tiny_mnist_model, tmp_path / "src")
    out = tmp_path / "coll"
    small = ["--epochs", "1", "--per-epoch", "2", "--n-train", "128", "--batch-size", "64"]
    assert main(["lgv", "--model", str(src), "--out", str(out), *small]) == 0
    assert "collected 2 LGV snapshots" in capsys.readouterr().out
    assert main(["lgv", "--model", str(src), "--out", str(out), *small]) == 2             # exists already
    assert "exists" in capsys.readouterr().err
    assert main(["lgv", "--model", str(src), "--out", str(tmp_path / "x"), "--per-epoch", "5", "--n-train", "128",
                 "--batch-size", "64"]) == 2                                                # 2 batches < 5 snapshots
    assert "per_epoch=5" in capsys.readouterr().err
    assert main(["lgv", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    base = ["benchmark", "--models", str(src), "--out", str(tmp_path / "b"), "--eps-grid", "none", "--n", "10",
            "--attacks", "pgd", "--param", "pgd.steps=2", "--param", "pgd.restarts=1", "--eps", "0.1"]
    assert main(base + ["--transfer-sources", str(out), "--set", "transfer.steps=3"]) == 0
    assert "transfer success" in capsys.readouterr().out
    tm = json.loads((tmp_path / "b" / "results.json").read_text())["transfer_matrix"]
    assert tm["sources"] == ["src", "lgv:coll"]
    assert main(base + ["--transfer-sources", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(base + ["--transfer", "--set", "transfer.steps=0"]) == 2
    assert "transfer.steps" in capsys.readouterr().err


def test_bad_input(tmp_path: Path, tiny_mnist_model: RobustModel) -> None:
    with pytest.raises(InputError, match="lr must be > 0"):
        collect_lgv(tiny_mnist_model, tmp_path / "a", lr=0.0, **LGV_KW)
    with pytest.raises(InputError, match="at least one model"):
        ModelCollection([])
    with pytest.raises(CheckpointError, match="not an LGV collection"):
        load_collection(tmp_path)
    with pytest.raises(InputError, match="steps must be >= 0"):
        LGV(eps=0.1, steps=-1)
    with pytest.raises(InputError, match="share classes"):
        from robustkit.zoo import create

        ModelCollection([tiny_mnist_model, create("ibp-small", 5, (1, 28, 28))])


def test_out_that_is_a_file_is_an_input_error(tmp_path: Path, tiny_mnist_model: RobustModel) -> None:
    """An --out that cannot be a directory is refused before any training (was a raw FileExistsError)."""
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(InputError, match="output directory"):
            collect_lgv(tiny_mnist_model, out, **LGV_KW)


def test_a_model_without_trainable_weights_is_refused_before_out_is_made(tmp_path: Path,
                                                                         tiny_mnist_model: RobustModel) -> None:
    """A fixed-alpha mix composite (frozen members) has nothing to train: an InputError up front, no empty --out
    (was a raw autograd RuntimeError at the first batch, after the directory was made)."""
    from robustkit.mix import mix_model

    with pytest.raises(InputError, match="none to train"):
        collect_lgv(mix_model(tiny_mnist_model, tiny_mnist_model, alpha=0.5), tmp_path / "c", **LGV_KW)
    assert not (tmp_path / "c").exists()
