import os

import pytest
import torch

from defenses.base import Defense
from defenses.schedules import make_schedule
from defenses.standard import Standard
from defenses.trainer import Trainer, make_optimizer
from robustkit.config import TrainConfig, dump_yaml, load_config
from robustkit.data import make_loader
from robustkit.errors import CheckpointError, ConfigError, InputError
from robustkit.io import atomic_write_text
from robustkit.runs import RunDir
from robustkit.zoo import create


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\nmodel: {arch: lenet}\noptim: {lr: 0.01}\neval: {eps: 8/255}\n")
    cfg = load_config(p, ["optim.momentum=0.5", "defense.params.beta=6"])
    assert isinstance(cfg, TrainConfig) and cfg.epochs == 3 and cfg.model.arch == "lenet"
    assert cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.5 and cfg.defense.params == {"beta": 6}
    assert load_config(None, []).optim.lr == 0.1
    assert "arch: lenet" in dump_yaml(cfg)


@pytest.mark.parametrize("text,msg", [
    ("epochs: 3\nfoo: 1\n", "unknown config key foo"),
    ("optim: {lrate: 0.1}\n", "unknown config key optim.lrate"),
    ("optim: {lr: fast}\n", "optim.lr: expected a number"),
    ("epochs: 2.5\n", "epochs: expected an integer"),
    ("optim: {lr: .nan}\n", "optim.lr: must be finite"),
    ("eval: {eps: 8/0}\n", "eval.eps"),
    ("eval: {eps: -0.1}\n", "eval.eps"),
    ("epochs: [1\n", "invalid YAML"),
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("model: 3\n", "model: expected a mapping"),
])
def test_config_errors(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_config(p)


def test_config_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["epochs"])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")

    from robustkit.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


class Interrupt(Defense):
    """Standard CE that raises at a given global step (a simulated kill)."""

    def __init__(self, at: int) -> None:
        self.inner, self.at = Standard(), at

    def before_loss(self, model, x, y, ctx):
        if ctx.step == self.at:
            raise KeyboardInterrupt

    def loss(self, model, x, y):
        return self.inner.loss(model, x, y)


def _trainer(run, defense, epochs=2):
    torch.manual_seed(0)
    model = create("ibp-small", 10, (1, 28, 28))
    loader = make_loader("mnist5k", "train", batch_size=100, n=600, seed=1, augment="crop-flip")
    opt = make_optimizer(model.parameters(), "sgd", 0.05, 0.9, 5e-4)
    return model, Trainer(model, defense, loader, epochs=epochs, optimizer=opt, schedule=make_schedule("cosine"),
                          run=run, best_by="train_acc", checkpoint_every=4, progress=False)


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
    ref_model, ref = _trainer(RunDir(tmp_path / "ref").create("{}"), Standard())
    ref.fit()
    run = RunDir(tmp_path / "int").create("{}")
    _, t = _trainer(run, Interrupt(at=9))  # epoch 2 of 2, mid-epoch; last checkpoint at step 8
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert len(run.metrics()) == 1
    torch.manual_seed(123)  # a different RNG state must not matter: it is restored
    model, t2 = _trainer(run, Standard())
    t2.fit(resume=True)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["epoch"] for r in run.metrics()] == [0, 1]
    assert run.checkpoint_dir("best") is not None


def test_checkpoint_swap_recovers_and_checks_arch(tmp_path):
    run = RunDir(tmp_path).create("{}")
    m = create("ibp-small", 10, (1, 28, 28))
    run.save_checkpoint("last", m, {"epoch": 1})
    os.replace(run.ckpt / "last", run.ckpt / "last.old")  # crash between the two renames
    assert run.load_checkpoint("last", m) == {"epoch": 1}
    with pytest.raises(CheckpointError, match="checkpoint is for 'ibp-small'"):
        run.load_checkpoint("last", create("lenet", 10, (1, 28, 28)))
    with pytest.raises(CheckpointError, match="already holds a run"):
        RunDir(tmp_path).create("{}")


def test_schedules_shapes():
    cos = make_schedule("cosine", warmup=0.1)
    assert cos(0.0) == 0.0 and cos(0.1) == pytest.approx(1.0) and cos(1.0) == pytest.approx(0.0)
    st = make_schedule("step", milestones=[0.5], gamma=0.1)
    assert st(0.4) == 1.0 and st(0.6) == pytest.approx(0.1)
    with pytest.raises(InputError, match="unknown LR schedule 'wavy'"):
        make_schedule("wavy")
