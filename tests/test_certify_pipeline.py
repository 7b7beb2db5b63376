"""The one certification pipeline: the three entry points (``robustkit certify``, ``run_benchmark``
with ``certify=[...]``, the quickstart's ``certify_stage``) give identical per-image certificates
for the same model, images and seed; per-image results do not depend on the chunking; resume
continues bit for bit; and every registered certifier honours the ``Certifier`` contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import certify  # noqa: F401  (registers the certifiers)
import robustkit.cli as cli
from certify.base import Certificate, Certifier, image_seeds
from robustkit.app.benchmark import run_benchmark
from robustkit.app.certify import Points, certify_points
from robustkit.app.quickstart import Settings, certify_stage
from robustkit.data import load_data
from robustkit.registry import CERTIFIERS
from robustkit.zoo import RobustModel, create, save

SIGMA, N0, N, ALPHA, EPS = 0.25, 20, 300, 0.01, 0.002   # the tiny model certifies L-inf radii ~0.003
N_SMOOTH, N_IBP = 6, 24
KEYS = ("index", "label", "prediction", "radius", "abstained", "correct")
SMOOTH_KEYS = KEYS + ("samples", "pA_lower", "nA")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _certs(records: list[dict[str, Any]], keys: tuple[str, ...] = KEYS) -> list[tuple[Any, ...]]:
    return [tuple(r[k] for k in keys) for r in records]


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory: pytest.TempPathFactory, tiny_mnist_model: RobustModel) -> Path:
    """The tiny model saved as the quickstart's noise, ibp and standard runs."""
    out = tmp_path_factory.mktemp("quick")
    for name in ("noise", "ibp", "standard"):
        save(tiny_mnist_model, out / name)
    return out


def test_three_entry_points_give_identical_certificates(quick_dir: Path, tmp_path: Path) -> None:
    model = str(quick_dir / "noise")
    # 1. robustkit certify
    common = ["--model", model, "--device", "cpu", "--seed", "0"]
    assert cli.main(["certify", *common, "--method", "smoothing", "--sigma", str(SIGMA), "--n0", str(N0), "--n",
                     str(N), "--alpha", str(ALPHA), "--n-images", str(N_SMOOTH), "--out", str(tmp_path / "s")]) == 0
    assert cli.main(["certify", *common, "--method", "ibp", "--eps", str(EPS), "--n-images", str(N_IBP),
                     "--out", str(tmp_path / "i")]) == 0
    cli_s = json.loads((tmp_path / "s" / "results.json").read_text())
    cli_i = json.loads((tmp_path / "i" / "results.json").read_text())
    # 2. the benchmark
    bench = run_benchmark([model], tmp_path / "b", n=N_IBP, eps=EPS, attacks=["pgd"], certify=["ibp", "smoothing"],
                          sigma=SIGMA, smoothing={"n0": N0, "n": N, "alpha": ALPHA, "n_images": N_SMOOTH},
                          attack_params={"pgd": {"steps": 2, "restarts": 1}}, eps_grid=[], seed=0, progress=False)
    b_cert = bench["models"][0]["certified"]
    # 3. the quickstart
    certify_stage(quick_dir, Settings(sigma=SIGMA, smoothing_n0=N0, smoothing_n=N, alpha=ALPHA,
                                      smoothing_images=N_SMOOTH, ibp_eps=EPS, ibp_images=N_IBP),
                  torch.device("cpu"), progress=False)
    quick = json.loads((quick_dir / "certify" / "results.json").read_text())

    smooth = _certs(cli_s["per_sample"], SMOOTH_KEYS)
    assert [r[0] for r in smooth] == list(range(N_SMOOTH)) and len({r[3] for r in smooth}) > 1   # not vacuous
    assert _certs(b_cert["smoothing"]["per_sample"], SMOOTH_KEYS) == smooth
    assert _certs(quick["smoothing"]["per_sample"], SMOOTH_KEYS) == smooth
    ibp = _certs(cli_i["per_sample"])
    assert len(ibp) == N_IBP and any(r[3] >= EPS for r in ibp) and any(0 < r[3] < EPS for r in ibp)
    assert _certs(b_cert["ibp"]["per_sample"]) == ibp
    assert _certs(quick["ibp"]["ibp"]["per_sample"]) == ibp
    # and one results schema: the same curve / ACR wherever it was computed
    for res in (b_cert["smoothing"], quick["smoothing"]):
        assert res["curve"] == cli_s["curve"] and res["average_certified_radius"] == cli_s["average_certified_radius"]
    for res in (b_cert["ibp"], quick["ibp"]["ibp"]):
        assert res["curve"] == cli_i["curve"] and res["average_certified_radius"] == cli_i["average_certified_radius"]
    at_eps = sum(r[5] and r[3] >= EPS for r in ibp) / N_IBP
    assert b_cert["ibp"]["certified_acc"] == pytest.approx(at_eps)


def _points(n: int, start: int = 0) -> Points:
    data = load_data("mnist5k", "test")
    idx = torch.arange(start, start + n) * 7                       # not 0..n-1: seeds follow the dataset index
    return Points(data.images[idx].float() / 255, data.labels[idx], idx, "mnist5k")


@pytest.mark.parametrize("name, kw", [("smoothing", {"sigma": SIGMA, "n0": N0, "n": N, "alpha": ALPHA}),
                                      ("smoothing", {"sigma": 0.5, "n0": 10, "n": 2000, "sequential": True}),
                                      ("ibp", {"eps": EPS}), ("crown-ibp", {"eps": EPS, "tol": 1e-2})])
def test_per_image_results_do_not_depend_on_chunks_or_batches(tiny_mnist_model: RobustModel, name: str,
                                                              kw: dict[str, Any]) -> None:
    pts = _points(7)
    runs = [certify_points(tiny_mnist_model, pts, CERTIFIERS.get(name)(**kw, batch_size=bs), chunk=chunk, seed=3,
                           progress=False)["per_sample"] for chunk, bs in ((1, 64), (3, 1000), (7, 37))]
    keys = SMOOTH_KEYS if name == "smoothing" else KEYS
    assert _certs(runs[0], keys) == _certs(runs[1], keys) == _certs(runs[2], keys)
    # an image alone gives its certificate from the batch; another seed gives other noise
    alone = certify_points(tiny_mnist_model, Points(pts.x[4:5], pts.y[4:5], pts.index[4:5]),
                           CERTIFIERS.get(name)(**kw), seed=3, progress=False)["per_sample"]
    assert _certs(alone, keys) == _certs(runs[0], keys)[4:5]
    if name == "smoothing":
        other = certify_points(tiny_mnist_model, pts, CERTIFIERS.get(name)(**kw), seed=4, progress=False)
        assert [r["pA_lower"] for r in other["per_sample"]] != [r["pA_lower"] for r in runs[0]]


def test_resume_continues_bit_for_bit(tiny_mnist_model: RobustModel, tmp_path: Path) -> None:
    certifier = CERTIFIERS.get("smoothing")(sigma=SIGMA, n0=N0, n=N, alpha=ALPHA)
    full = certify_points(tiny_mnist_model, _points(6), certifier, chunk=2, seed=1, progress=False)
    certify_points(tiny_mnist_model, _points(3), certifier, chunk=2, seed=1, out=tmp_path, progress=False)
    again = certify_points(tiny_mnist_model, _points(6), certifier, chunk=4, seed=1, out=tmp_path, resume=True,
                           progress=False)
    assert _certs(again["per_sample"], SMOOTH_KEYS) == _certs(full["per_sample"], SMOOTH_KEYS)
    from robustkit.errors import InputError

    with pytest.raises(InputError, match="different settings"):        # another seed: refuse to mix
        certify_points(tiny_mnist_model, _points(6), certifier, seed=2, out=tmp_path, resume=True, progress=False)


def test_image_seeds_depend_on_seed_and_index_only() -> None:
    s = image_seeds(0, [0, 1, 2, 1000])
    assert s.dtype == torch.int64 and (s >= 0).all() and len(set(s.tolist())) == 4
    assert torch.equal(image_seeds(0, [2]), s[2:3]) and not torch.equal(image_seeds(1, [0, 1, 2, 1000]), s)


# -- the Certifier contract, over every registered certifier ------------------------------------
CHEAP = {"smoothing": {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.01, "batch_size": 128},
         "dual-smoothing": {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.01, "batch_size": 128},
         "ibp": {"eps": 0.02, "tol": 1e-2}, "crown-ibp": {"eps": 0.02, "tol": 1e-2}}


@pytest.mark.parametrize("name", CERTIFIERS.names())
def test_certifier_contract(name: str, tiny_mnist_model: RobustModel,
                            mnist_test_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    certifier = CERTIFIERS.get(name)(**CHEAP.get(name, {}))
    assert isinstance(certifier, Certifier) and certifier.name == name and certifier.norm in ("l2", "linf")
    assert isinstance(certifier.deterministic, bool) and certifier.radius_scale > 0 and certifier.guarantee
    json.dumps(certifier.params())
    with pytest.raises(TypeError):                                       # hyperparameters are keyword-only
        CERTIFIERS.get(name)(0.25)
    x = mnist_test_batch[0][:6].clone()
    x0, seeds = x.clone(), image_seeds(0, range(6))
    torch.manual_seed(0)                                     # dual-smoothing certifies a dual-subimage composite
    model = (create("dual-subimage", 10, (1, 28, 28)) if name == "dual-smoothing" else tiny_mnist_model).train()
    try:
        cert = certifier(model, x, seeds=seeds)
        assert model.training and all(m.training for m in model.modules())   # the mode is restored
    finally:
        model.eval()
    assert torch.equal(x, x0)                                                 # x is not changed
    assert isinstance(cert, Certificate)
    assert cert.prediction.shape == cert.radius.shape == cert.abstained.shape == (6,)
    assert cert.prediction.dtype == torch.int64 and cert.radius.dtype == torch.float64
    assert cert.abstained.dtype == torch.bool
    assert torch.isfinite(cert.radius).all() and (cert.radius >= 0).all()
    ab = cert.abstained                                                       # abstention is explicit
    assert (cert.prediction[ab] == -1).all() and (cert.radius[ab] == 0).all()
    assert ((cert.prediction[~ab] >= 0) & (cert.prediction[~ab] < 10)).all()
    assert all(v.shape == (6,) for v in (cert.info or {}).values() if isinstance(v, torch.Tensor))
    again = certifier(model, x, seeds=seeds)                                  # same seeds: the same certificates
    assert torch.equal(again.prediction, cert.prediction) and torch.equal(again.radius, cert.radius)
    if certifier.deterministic:
        free = certifier(model, x)                                            # no seeds needed
        assert torch.equal(free.radius, cert.radius) and not cert.abstained.any()
