import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustkit.errors import InputError
from robustkit.registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry, RegistryError
from robustkit.threat import ThreatModel, parse_eps


def test_registry_register_get_names():
    r: Registry = Registry("thing")

    @r.register("my_thing")
    class A:
        """An A."""

    assert r.get("my-thing") is A and r.get("MY_THING") is A
    assert r.get(A) is A
    assert r.names() == ["my-thing"]
    assert r.help("my-thing") == "An A."


def test_registry_unknown_lists_valid():
    r: Registry = Registry("widget")
    r.register("alpha")(object)
    r.register("beta")(int)
    with pytest.raises(RegistryError, match=r"unknown widget 'gamma'; valid widgets: alpha, beta"):
        r.get("gamma")
    with pytest.raises(RegistryError, match="already registered"):
        r.register("alpha")(float)


@pytest.mark.parametrize("reg", [MODELS, DATASETS, DEFENSES])
def test_global_registries_raise_listing(reg):
    import defenses  # noqa: F401
    import robustkit.data  # noqa: F401
    import robustkit.nets  # noqa: F401

    with pytest.raises(KeyError) as e:
        reg.get("no-such-name")
    for name in reg.names()[:3]:
        assert name in str(e.value)
    assert ATTACKS.kind == "attack"


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.3", 0.3), (0.5, 0.5), (" 2/255 ", 2 / 255), (0, 0.0)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["-1", -0.1, "abc", "1/0", "nan", float("inf"), True, None, [1]])
def test_parse_eps_errors(bad):
    with pytest.raises(InputError, match="eps"):
        parse_eps(bad)


def test_threat_validation():
    with pytest.raises(InputError, match="unknown norm 'l3'; allowed: linf, l2"):
        ThreatModel("l3", 0.1)
    with pytest.raises(InputError, match="eps must be >= 0"):
        ThreatModel("linf", -0.1)
    assert ThreatModel("Linf", "8/255").eps == pytest.approx(8 / 255)


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 3.0), b=st.integers(1, 5),
       c=st.sampled_from([1, 3]), hw=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_project_and_random_start_stay_inside(norm, eps, b, c, hw, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, hw, hw, generator=g)
    tm = ThreatModel(norm, eps)
    far = x + 5 * torch.randn(x.shape, generator=g)
    for z in (tm.project(far, x), tm.random_start(x, generator=g),
              tm.project(tm.step(x, torch.randn(x.shape, generator=g), 0.7 * eps + 0.01), x)):
        assert bool(tm.contains(z, x, tol=1e-5).all())
        assert z.min() >= 0 and z.max() <= 1


def test_step_directions():
    x = torch.full((2, 1, 2, 2), 0.5)
    g = torch.tensor([1.0, -2.0, 0.0, 3.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    lin = ThreatModel("linf", 0.1).step(x, g, 0.1) - x
    assert torch.allclose(lin, 0.1 * g.sign())
    l2 = ThreatModel("l2", 1.0).step(x, g, 0.5) - x
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.full((2,), 0.5))


def test_linf_projection_is_exact_clip():
    x = torch.tensor([[[[0.05, 0.5, 0.98]]]])
    adv = torch.tensor([[[[-0.3, 0.9, 1.5]]]])
    out = ThreatModel("linf", 0.1).project(adv, x)
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.6, 1.0]]]]))


def test_tensor_eps_per_sample():
    x = torch.rand(3, 1, 4, 4)
    eps = torch.tensor([0.0, 0.1, 0.2])
    tm = ThreatModel("linf", eps)
    z = tm.project(x + 1.0, x)
    assert torch.all(tm.norm_of(z - x) <= eps + 1e-6)
