"""The shared attack loop (attacks/_loop.py): compaction, the best-so-far record, the DLR rule,
seeds, AMP / channels_last, input-only gradients, and APGD's checkpoint rule (Croce & Hein 2020)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import attacks  # noqa: F401  (registers the attacks)
from attacks._compact import DEFAULT_SEED, autocast_available
from attacks._loop import FixedStep, LoopOptions, Record, Rows, run
from attacks._losses import loss_fn
from attacks.apgd import APGD, APGDStep
from attacks.fast import FastEnsemble
from attacks.pgd import PGD
from robustkit.errors import InputError
from robustkit.threat import ThreatModel


# -- compaction ---------------------------------------------------------------------------------
def _loop(model, x, y, rule, every, copies=1, steps=15, loss="ce"):
    rec = Record.start(x)
    opts = LoopOptions(every, generator=torch.Generator().manual_seed(0))
    run(model, x, y, rec, ThreatModel("linf", 0.1), rule, loss_fn(loss, False), steps,
        torch.arange(x.shape[0]), opts, copies=copies)
    return rec


@pytest.mark.parametrize("kind", ["pgd", "apgd-2-copies"])
def test_compaction_keeps_results_identical(tiny_mnist_model, mnist_test_batch, kind: str) -> None:
    x, y = mnist_test_batch
    copies = 2 if kind != "pgd" else 1

    def rule():
        return FixedStep(0.025) if kind == "pgd" else APGDStep(15, 0.1)

    never = _loop(tiny_mnist_model, x, y, rule(), None, copies)
    assert bool((never.queries == 16 * copies).all()) and never.forward == 64 * 16 * copies
    assert never.fooled.any() and not never.fooled.all()
    for every in (1, 4):
        rec = _loop(tiny_mnist_model, x, y, rule(), every, copies)
        assert torch.equal(rec.fooled, never.fooled) and torch.equal(rec.x, never.x)
        assert torch.equal(rec.loss[~rec.fooled], never.loss[~never.fooled])
        assert rec.forward < never.forward and int(rec.queries.max()) == 16 * copies
        assert bool((rec.queries[rec.fooled] < 16 * copies).any())


# -- the best-so-far record ---------------------------------------------------------------------
class _MeanModel(nn.Module):
    """Two classes; class 1's logit is ``10 * (mean pixel - 0.5)``: CE towards label 0 grows with
    the mean, and the label flips (the goal) once the mean exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(m), 10 * (m - 0.5)], 1)


class _Script:
    """A step rule that visits scripted constant images: row ``r``'s iterate ``t`` is ``script[r][t]``."""

    uses_loss = False

    def __init__(self, script: list[list[float]]) -> None:
        self.script = torch.tensor(script)                                 # (N, T)

    def step(self, t: int, rows: Rows, tm: ThreatModel) -> torch.Tensor:
        if t == 0:
            rows["row"] = torch.arange(rows["x"].shape[0])                 # compacted with the rows
        return self.script[rows["row"], t + 1].view(-1, 1, 1, 1).expand_as(rows["x"]).clone()


@pytest.mark.parametrize("every", [1, 2, None])
def test_record_first_success_else_highest_loss(every: int | None) -> None:
    # rows are [owner 0..2 copy 0, owner 0..2 copy 1]; iterate 0 is the clean image (0.1)
    script = [[0.1, 0.3, 0.2], [0.1, 0.2, 0.7], [0.1, 0.55, 0.2],      # copy 0
              [0.1, 0.2, 0.45], [0.1, 0.6, 0.8], [0.1, 0.9, 0.3]]      # copy 1
    x, y = torch.full((3, 1, 2, 2), 0.1), torch.zeros(3, dtype=torch.long)
    rec = Record.start(x)
    run(_MeanModel(), x, y, rec, ThreatModel("linf", 1.0), _Script(script), loss_fn("ce", False), 2,
        torch.arange(3), LoopOptions(every), copies=2, random_start=False)
    means = rec.x.flatten(1).mean(1)
    assert rec.fooled.tolist() == [False, True, True]
    # owner 0: highest loss over both copies and all iterates; owner 1: the FIRST success (copy 1,
    # step 1), not the later higher-loss one; owner 2: both copies succeed at step 1 -> the first copy
    assert means.tolist() == pytest.approx([0.45, 0.6, 0.55])
    assert rec.loss[0].item() == pytest.approx(nn.functional.softplus(torch.tensor(10 * (0.45 - 0.5))).item())
    done_q = 2 * 3 if every is None else 2 * 2       # two copies; compaction after step 1 saves the last forward
    assert rec.queries.tolist() == [6, done_q, done_q]
    assert rec.backward == 2 * 6 and rec.forward == 6 + 6 + (6 if every is None else 2)


def test_pgd_restarts_keep_the_best_over_restarts(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    one = PGD(eps=0.05, steps=3, restarts=1, seed=0)(tiny_mnist_model, x, y)
    three = PGD(eps=0.05, steps=3, restarts=3, seed=0)(tiny_mnist_model, x, y)
    f = nn.functional.cross_entropy
    with torch.no_grad():
        l1, l3 = (f(tiny_mnist_model(r.x_adv), y, reduction="none") for r in (one, three))
    standing = ~three.success
    assert standing.any() and bool((l3[standing] >= l1[standing] - 1e-4).all())


def test_gradients_wrt_the_input_only(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:8], mnist_test_batch[1][:8]
    model = copy.deepcopy(tiny_mnist_model)
    for p in model.parameters():
        p.grad = None                                                     # training left gradients behind
    for atk in (PGD(eps=0.1, steps=2), APGD(eps=0.1, n_iter=2), FastEnsemble(eps=0.1, n_iter=2, n_targets=1)):
        atk(model, x, y)
        assert all(p.grad is None for p in model.parameters())


# -- the DLR rule: DLR needs >= 3 classes, targeted DLR >= 4, everywhere ---------------------------
def _linear(k: int, num_classes: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, k)).eval()
    if num_classes:
        m.num_classes = k
    return m


class _Counting(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("make,k", [
    (lambda: PGD(eps=0.1, loss="dlr"), 2), (lambda: PGD(eps=0.1, loss="dlr", targeted=True), 3),
    (lambda: APGD(eps=0.1, loss="dlr"), 2), (lambda: APGD(eps=0.1, loss="dlr-targeted"), 3),
    (lambda: APGD(eps=0.1, loss="dlr-targeted", targeted=True), 3), (lambda: FastEnsemble(eps=0.1), 3)])
def test_dlr_needs_classes_before_any_attack_work(make, k: int) -> None:
    for named in (True, False):                                            # with and without model.num_classes
        model = _Counting(_linear(k, named))
        with pytest.raises(InputError, match="needs at least"):
            make()(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]))
        assert model.calls <= 1                                           # at most the clean / first forward


def test_dlr_runs_at_the_class_limit() -> None:
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    for atk, k in ((PGD(eps=0.1, loss="dlr", steps=3), 3), (APGD(eps=0.1, loss="dlr", n_iter=3), 3),
                   (APGD(eps=0.1, loss="dlr-targeted", n_iter=3), 4), (FastEnsemble(eps=0.1, n_iter=3), 4)):
        r = atk(_linear(k), x, y)
        assert r.x_adv.shape == x.shape and bool(torch.isfinite(r.x_adv).all())


# -- seeds ----------------------------------------------------------------------------------------
def test_one_default_seed_and_reproducible_runs(tiny_mnist_model, mnist_test_batch) -> None:
    x, y = mnist_test_batch[0][:16], mnist_test_batch[1][:16]
    assert PGD(eps=0.1).seed == APGD().seed == FastEnsemble().seed == DEFAULT_SEED == 0
    for make in (lambda **kw: PGD(eps=0.2, steps=3, **kw), lambda **kw: APGD(eps=0.2, n_iter=3, **kw)):
        a, b = make()(tiny_mnist_model, x, y), make(seed=0)(tiny_mnist_model, x, y)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        c = make(seed=1)(tiny_mnist_model, x, y)
        assert not torch.equal(a.x_adv, c.x_adv)                           # the seed drives the random start
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(make(seed=None)(tiny_mnist_model, x, y).x_adv)   # None: the global RNG
        assert torch.equal(*runs)


# -- AMP (bf16 autocast) and channels_last --------------------------------------------------------
class _Probe(nn.Module):
    """Records the dtype of the logits and whether inputs came in channels_last layout."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net, self.num_classes, self.dtypes, self.formats = net, num_classes, set(), set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.add(out.dtype)
        self.formats.add(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return out


ATTACKS_KW = [lambda **kw: PGD(eps=0.3, steps=10, **kw), lambda **kw: APGD(eps=0.3, n_iter=10, **kw),
              lambda **kw: FastEnsemble(eps=0.3, n_iter=5, n_targets=1, **kw)]


@pytest.mark.skipif(not autocast_available("cpu"), reason="no CPU autocast in this torch")
@pytest.mark.parametrize("make", ATTACKS_KW, ids=["pgd", "apgd", "fast"])
def test_amp_bf16_on_cpu(tiny_mnist_model, mnist_test_batch, make) -> None:
    x, y = mnist_test_batch[0][:32], mnist_test_batch[1][:32]
    ref = make()(tiny_mnist_model, x, y)
    probe = _Probe(tiny_mnist_model, 10)
    r = make(amp=True)(probe, x, y)
    assert probe.dtypes == {torch.bfloat16}                                # every forward ran in bf16
    assert r.x_adv.dtype == x.dtype and bool(ThreatModel("linf", 0.3).contains(r.x_adv, x).all())
    assert abs(int(r.success.sum()) - int(ref.success.sum())) <= 2        # bf16 rounding, same attack


@pytest.mark.parametrize("make", ATTACKS_KW, ids=["pgd", "apgd", "fast"])
def test_channels_last_same_attack(make) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    ref = make()(_Probe(net, 10), x, y)
    probe = _Probe(net.to(memory_format=torch.channels_last), 10)
    r = make(channels_last=True)(probe, x, y)
    assert probe.formats == {True}
    assert torch.equal(r.success, ref.success) and torch.allclose(r.x_adv, ref.x_adv, atol=1e-5)


# -- APGD's step-size rule (Croce & Hein 2020, Alg. 1 and Sec. 3.2) -------------------------------
def _paper_checkpoints(n_iter: int) -> list[int]:
    """w_j = ceil(p_j * N) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p, out = [0.0, 0.22], []
    while p[-1] <= 1.0:
        out.append(math.ceil(round(p[-1] * n_iter, 9)))
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return [w for w in out if w < n_iter]


def _rows(n: int) -> Rows:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 1, 2, 2, generator=g) * 0.5 + 0.25
    return {"x0": x0, "x": x0.clone(), "bx": x0 + 0.01, "g": torch.randn(n, 1, 2, 2, generator=g)}


def test_apgd_checkpoints_match_the_paper() -> None:
    rule, rows = APGDStep(100, 0.1), _rows(1)
    seen = []
    for t in range(100):
        rows.update(loss=torch.tensor([float(t)]), bl=torch.tensor([float(t)]), better=torch.tensor([True]))
        rule.step(t, rows, ThreatModel("linf", 0.1))
        if t > 0 and rule.since == 0:
            seen.append(t)
    assert seen == _paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_halving_conditions() -> None:
    """At the first checkpoint (k = 22 steps): row 0's loss rose at every step (no halving); row 1's
    never rose (condition 1: <= rho * k increases); row 2's rose 17 times (> 0.75 * 22) but its best
    never improved (condition 2). Halved rows restart from their best point."""
    tm, rule, rows = ThreatModel("linf", 0.1), APGDStep(100, 0.1), _rows(3)
    seq2 = [10.0, 0.0] + [0.1 * i for i in range(1, 18)] + [1.0, 0.9, 0.8, 0.7]   # 17 rises, best stays 10
    for t in range(23):
        loss = torch.tensor([float(t), 5.0, seq2[t]])
        bl = loss if t == 0 else torch.maximum(rows["bl"], loss)
        better = torch.ones(3, dtype=torch.bool) if t == 0 else loss > rows["bl"]
        rows.update(loss=loss, bl=bl, better=better)
        base = rows["x"]
        rows["x"] = rule.step(t, rows, tm)
    assert rule.since == 0 and rule.k == 19                                 # the checkpoint was at t = 22
    assert rows["eta"].tolist() == pytest.approx([0.2, 0.1, 0.1])           # eta_0 = 2 eps, halved for rows 1, 2
    assert rows["red_ck"].tolist() == [False, True, True]
    assert torch.equal(rows["xp"][0], base[0])                              # the step started from x_k ...
    assert torch.equal(rows["xp"][1:], rows["bx"][1:])                      # ... or from x_max after a halving
