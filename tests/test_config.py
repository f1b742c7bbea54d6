import json

import pytest

from lmm.config import ConfigError, defaults, flat_keys, load_config, parse_override


def test_defaults_and_overrides():
    cfg = load_config(None, ["teacher.train.steps=7", "student.grid=[0.0, 0.6]", "run.dir=runs/x", "run.bf16=true"])
    assert cfg["teacher"]["train"]["steps"] == 7
    assert cfg["student"]["grid"] == [0.0, 0.6]
    assert cfg["run"]["dir"] == "runs/x" and cfg["run"]["bf16"] is True
    assert defaults()["teacher"]["train"]["steps"] != 7  # defaults are not mutated


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'teacher.train.stepz'.*valid keys here: .*steps"):
        load_config(None, ["teacher.train.stepz=3"])
    preset = tmp_path / "p.toml"
    preset.write_text("[data]\nnmae = 'digits'\n")
    with pytest.raises(ConfigError, match=r"p.toml: unknown key 'data.nmae'"):
        load_config(preset)


def test_wrong_type_and_bad_override():
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["pairs.n=lots"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("pairs.n")
    assert load_config(None, ["student.train.lr=1"])["student"]["train"]["lr"] == 1.0


def test_net_tables_replaced_by_preset_updated_by_override(tmp_path):
    preset = tmp_path / "mlp.toml"
    preset.write_text("[teacher.net]\nkind = 'mlp'\nwidth = 64\n")
    cfg = load_config(preset, ["teacher.net.depth=3"])
    assert cfg["teacher"]["net"] == {"kind": "mlp", "width": 64, "depth": 3}


def test_presets_in_repo_load():
    import tomllib
    from pathlib import Path

    def leaves(table: dict, prefix: str = ""):
        for key, value in table.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    paths = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert {"digits.toml", "toy_moons.toml", "fashion_mnist.toml"} <= {p.name for p in paths}
    for path in paths:
        cfg = load_config(path)
        json.dumps(cfg)
        own = tomllib.loads(path.read_text())
        own.pop("base", None)
        flat, preset = dict(flat_keys(cfg)), dict(leaves(own))
        # every value the preset sets is the loaded one (read independently of lmm.config), run.dir included
        assert {k: flat.get(k, "missing") for k in preset} == preset, path.name
        assert flat["run.dir"] == preset["run.dir"] != defaults()["run"]["dir"], path.name


def test_preset_extends_a_base(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.toml").write_text("[run]\ndir = 'runs/root'\nseed = 7\n[teacher.net]\nkind = 'mlp'\nwidth = 32\n"
                                        "[student]\nloss = {l2 = 1.0, perceptual = 0.01}\n")
    (tmp_path / "sub" / "mid.toml").write_text("base = '../root.toml'\n[run]\ndir = 'runs/mid'\n"
                                               "[student]\nloss = {l2 = 1.0}\n")
    child = tmp_path / "sub" / "child.toml"
    child.write_text("base = 'mid.toml'\n[data]\nconditional = true\n[teacher.net]\nkind = 'mlp'\ndepth = 2\n")
    cfg = load_config(child, ["run.seed=9"])
    assert cfg["run"]["dir"] == "runs/mid" and cfg["run"]["seed"] == 9 and cfg["data"]["conditional"] is True
    assert cfg["student"]["loss"] == {"l2": 1.0}
    assert cfg["teacher"]["net"] == {"kind": "mlp", "depth": 2}
    assert load_config(child)["run"]["seed"] == 7

    (tmp_path / "loop.toml").write_text("base = 'loop2.toml'\n")
    (tmp_path / "loop2.toml").write_text("base = 'loop.toml'\n")
    with pytest.raises(ConfigError, match="loop.toml: 'base' chain loops"):
        load_config(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text("base = 'gone.toml'\n")
    with pytest.raises(ConfigError, match=r"gone.toml \(base of .*orphan.toml\)"):
        load_config(tmp_path / "orphan.toml")
    (tmp_path / "bad.toml").write_text("base = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: 'base' expects the file name"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "badkey.toml").write_text("base = 'root.toml'\n[run]\ndirr = 'x'\n")
    with pytest.raises(ConfigError, match="badkey.toml: unknown key 'run.dirr'"):
        load_config(tmp_path / "badkey.toml")


def test_bf16_auto_follows_the_cpu_flags(monkeypatch, tmp_path):
    import torch

    from lmm import dist

    assert dist.resolve_bf16(True, torch.device("cpu")) is True
    assert dist.resolve_bf16(False, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="run.bf16"):
        dist.resolve_bf16("yes", torch.device("cpu"))
    for flags, want in (("fpu avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        real_path = dist.Path
        monkeypatch.setattr(dist, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
        assert dist.resolve_bf16("auto", torch.device("cpu")) is want
    assert load_config(None, ["run.bf16=false"])["run"]["bf16"] is False
    assert load_config(None)["run"]["bf16"] == "auto"
    with pytest.raises(ConfigError, match="expects true, false or"):
        load_config(None, ["run.bf16=1"])
