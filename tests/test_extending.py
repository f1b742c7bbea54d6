"""Extending lmm from outside the package: a plugin module (written here into tmp_path, installed as an entry point
of group `lmm.plugins`) registers a loss term with one option, a student objective and a teacher kind, and the
`lmm` command runs each of them; no file under lmm/ is touched."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

PLUGIN = textwrap.dedent('''
    """A plugin: an L1 loss term, an endpoint-L1 student objective, a flow teacher trained at logit-normal times."""
    from dataclasses import dataclass

    import torch

    from lmm.losses.base import LossTerm
    from lmm.nets.precond import LinesModel
    from lmm.objectives.base import Objective, line_point, student_precond
    from lmm.objectives.flow_matching import FlowMatching
    from lmm.plugins import register_loss_term, register_objective, register_student_objective, register_teacher
    from lmm.registry import option
    from lmm.teachers.flow import FlowTeacher


    class L1(LossTerm):
        @dataclass(frozen=True)
        class Options:
            scale: float = option(1.0, min=0.0)

        def __init__(self, scale: float = Options.scale) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, pred, target, ctx):
            return self.scale * (pred - target).abs().flatten(1).mean(1)


    class EndpointL1(Objective):
        required_keys = ("z", "x1")
        reads = ("precond", "sigma_data", "window")

        def __init__(self, precond="lines", sigma_data=0.5, sigma_max=80.0, denoiser="edm"):
            super().__init__()
            self.precond, self.sigma_data, self.sigma_max, self.denoiser = precond, sigma_data, sigma_max, denoiser

        @classmethod
        def from_config(cls, scfg, tcfg):
            return cls(**student_precond(scfg["precond"], scfg["sigma_data"], tcfg))

        def build_model(self, net):
            return LinesModel(net, self.sigma_data, self.precond, self.sigma_max, self.denoiser)

        def forward(self, model, batch, step=0):
            z, x1 = batch["z"], batch["x1"]
            t = torch.rand(x1.shape[0], dtype=x1.dtype)
            return (model(line_point(z, x1, t), t, batch.get("y")) - x1).abs().flatten(1).mean(1)


    class LogitFlowMatching(FlowMatching):
        def __init__(self):
            super().__init__(time_sampling="logit_normal")


    class LogitFlowTeacher(FlowTeacher):
        objective = "logit_flow_matching"


    register_loss_term("l1", L1)
    register_student_objective("endpoint_l1", EndpointL1)
    register_objective("logit_flow_matching", LogitFlowMatching)
    register_teacher("logit_flow", LogitFlowTeacher)
''')
ENTRY_POINTS = "[lmm.plugins]\nmine = lmm_test_plugin\n"
TINY = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.steps=2", "pairs.n=64",
        "pairs.shard_size=32", "pairs.batch_size=32", "student.train.steps=4", "student.train.batch_size=16"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """A folder on PYTHONPATH holding the plugin module and the dist-info that declares its entry point."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "lmm_test_plugin.py").write_text(PLUGIN)
    info = root / "lmm_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmm-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _lmm(plugin: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(plugin), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmm.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_plugin_adds_a_loss_term_an_objective_and_a_teacher_kind(plugin, tmp_path):
    listing = _ok(_lmm(plugin, "config", "student.l1.scale=2.5"))
    assert "student.l1.scale = 2.5" in listing
    assert "student.l1.scale = 1.0" in _ok(_lmm(plugin, "config"))
    bad = _lmm(plugin, "config", "student.l1.scale=-1")
    assert bad.returncode == 2 and "'student.l1.scale' must be >= 0" in bad.stderr
    unknown = _lmm(plugin, "config", "teacher.kind=logit_flow", env={"PYTHONPATH": ""})
    assert unknown.returncode == 2 and "unknown" not in unknown.stdout and "'teacher.kind' must be one of" in unknown.stderr

    run = tmp_path / "run"
    _ok(_lmm(plugin, "teacher", "train", f"run.dir={run}", "teacher.kind=logit_flow", *TINY))
    _ok(_lmm(plugin, "sample", "--model", str(run / "teacher"), "--steps", "2", "-n", "8", "--device", "cpu",
             "--out", str(tmp_path / "teacher.npz")))
    _ok(_lmm(plugin, "pairs", f"run.dir={run}", "teacher.kind=logit_flow", *TINY))
    for objective, extra in (("endpoint_l1", []), ("lines", ["student.loss={l2=1.0,l1=0.5}", "student.l1.scale=2.0"])):
        student_run = tmp_path / objective
        _ok(_lmm(plugin, "train", f"run.dir={student_run}", "teacher.kind=logit_flow", f"student.objective={objective}",
                 *extra, *TINY, "--pairs", str(run / "pairs"), "--teacher", str(run / "teacher")))
        out = tmp_path / f"{objective}.npz"
        _ok(_lmm(plugin, "sample", "--model", str(student_run / "student"), "--nfe", "1", "-n", "8", "--device", "cpu",
                 "--out", str(out)))
        assert np.load(out)["images"].shape == (8, 8, 8, 1)
    meta = (tmp_path / "lines" / "student" / "model.json").read_text()
    assert '"l1": 0.5' in meta and '"scale": 2.0' in meta
    by_env = _lmm(plugin, "config", "student.objective=endpoint_l1", env={"LMM_PLUGINS": "lmm_test_plugin"})
    assert by_env.returncode == 0, by_env.stderr
