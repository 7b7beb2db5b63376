"""``robustkit.app.build``: the one attack builder (strict params, lenient shared defaults) and the
YAML recipes of ``robustkit attack`` / ``robustkit benchmark``."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustkit.app._bench_attacks import bench_attack
from robustkit.app.build import build_attack, build_chain
from robustkit.config import AttackConfig, BenchmarkConfig, load_config
from robustkit.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'stepz' is not accepted by attack 'pgd'; valid keys: .*restarts.*steps"):
        build_attack("pgd", {"stepz": 3}, eps=0.1)
    with pytest.raises(ConfigError, match=r"'steps' is not accepted by attack 'deepfool'; valid keys: candidates"):
        build_attack("deepfool", {"steps": 3})


def test_required_unknown_and_rejected_values() -> None:
    with pytest.raises(ConfigError, match="attack 'pgd' needs eps"):
        build_attack("pgd", {"steps": 3})
    with pytest.raises(ConfigError, match="unknown attack 'nope'; valid attacks: .*pgd"):
        build_attack("nope")
    with pytest.raises(ConfigError, match="attack 'pgd': .*loss"):
        build_attack("pgd", {"loss": "bogus"}, eps=0.1)


def test_shared_defaults_only_where_accepted() -> None:
    pgd = build_attack("pgd", {"steps": 3}, norm="l2", eps=1.0, seed=7, amp=True, batch_size=64, log_dir="logs")
    assert (pgd.norm, pgd.eps, pgd.steps, pgd.seed, pgd.amp) == ("l2", 1.0, 3, 7, True)
    df = build_attack("deepfool", {}, norm="l2", eps=1.0, seed=7, amp=True, batch_size=64)   # takes no seed/amp
    assert (df.norm, df.eps) == ("l2", 1.0)
    aa = build_attack("autoattack", {"version": "plus"}, eps=0.1, seed=3, batch_size=64, log_dir="logs")
    assert (aa.seed, aa.batch_size, aa.log_dir, aa.version) == (3, 64, "logs", "plus")
    assert build_attack("pgd", {"eps": 0.2}, eps=0.1).eps == 0.2                       # params win


def test_chain_routes_each_key_to_the_attacks_that_take_it() -> None:
    pgd, df = build_chain(["pgd", "deepfool"], {"steps": 4, "overshoot": 0.05}, eps=0.5, norm="l2")
    assert pgd.steps == 4 and df.overshoot == 0.05 and pgd.eps == df.eps == 0.5
    with pytest.raises(ConfigError, match="'bogus' is not accepted by attack pgd, deepfool .*pgd: .*; deepfool: "):
        build_chain(["pgd", "deepfool"], {"bogus": 1}, eps=0.5)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("attack_*.yaml")), ids=lambda p: p.name)
def test_attack_recipes_load_and_build(path: Path) -> None:
    cfg = load_config(path, cls=AttackConfig)
    assert isinstance(cfg, AttackConfig) and cfg.attack and cfg.eps_values
    for e in cfg.eps_values:
        chain = build_chain(cfg.attack, cfg.params, norm=cfg.norm, eps=e, seed=cfg.seed, amp=cfg.amp)
        assert [a.name for a in chain] == cfg.attack and all(a.eps == e for a in chain)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("benchmark_*.yaml")), ids=lambda p: p.name)
def test_benchmark_recipes_load_and_build(path: Path) -> None:
    cfg = load_config(path, ["models=[runs/a]"], cls=BenchmarkConfig)
    assert isinstance(cfg, BenchmarkConfig) and cfg.models == ["runs/a"] and cfg.attacks
    for name in cfg.attacks:
        assert bench_attack(name, cfg, cfg.eps_value, None).eps == pytest.approx(cfg.eps_value)


def test_recipe_values_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "attack_mnist5k_pgd_linf.yaml").read_text().replace('eps: "0.3"', 'eps: "-3"'))
    with pytest.raises(ConfigError, match="eps: eps must be >= 0"):
        load_config(bad, cls=AttackConfig)
    with pytest.raises(ConfigError, match="mode: mode must be one of chained, independent"):
        load_config(CONFIGS / "attack_mnist5k_pgd_linf.yaml", ["mode=parallel"], cls=AttackConfig)
    with pytest.raises(ConfigError, match="unknown config key smoothing.m; valid keys in smoothing"):
        load_config(CONFIGS / "benchmark_mnist5k_linf.yaml", ["smoothing.m=3"], cls=BenchmarkConfig)
    with pytest.raises(ConfigError, match="attack_params.pgd: expected a mapping"):
        load_config(CONFIGS / "benchmark_mnist5k_linf.yaml", ["attack_params.pgd=3"], cls=BenchmarkConfig)
