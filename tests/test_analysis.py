"""`lmm analyze`: mini-batch OT against the closed-form Gaussian map, and endpoint collapse near the noise end."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

from lmm.analysis.ot import (
    default_resolutions,
    gaussian_ot_map,
    growth_fit,
    needed_batch,
    pair_store_coupling,
    pairing_error,
    random_gaussian,
    sym_sqrt,
)
from lmm.cli.main import build_parser, main
from lmm.pairs import make_pairs

F64 = torch.float64
TOY_RUN = ["-c", str(Path(__file__).parent.parent / "configs" / "toy_moons.toml"), "run.progress=false",
           "teacher.train.steps=100", "student.train.steps=40", "teacher.train.warmup_steps=20",
           "student.train.warmup_steps=20", "teacher.train.ema_halflife=500.0", "student.train.ema_halflife=500.0",
           "teacher.train.batch_size=128", "student.train.batch_size=128", "teacher.net.width=64",
           "student.net.width=64", "teacher.net.depth=3", "student.net.depth=3", "teacher.steps=8", "pairs.n=256",
           "pairs.shard_size=256", "pairs.batch_size=256", "data.n=2000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process stages on one thread (see conftest)


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T + 0.3 * torch.eye(d, dtype=F64)


def test_gaussian_map_pushes_moments_and_is_a_convex_gradient():
    d = 3
    m1, m2 = torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([1.0, 0.0, -0.5], dtype=F64)
    S1, S2 = _spd(d, 0), _spd(d, 1)
    A, b = gaussian_ot_map(m1, S1, m2, S2)
    torch.testing.assert_close(A, A.T)
    assert torch.linalg.eigvalsh(A).min() > 0
    torch.testing.assert_close(A @ S1 @ A.T, S2)
    torch.testing.assert_close(A @ m1 + b, m2)
    g = torch.Generator().manual_seed(2)
    x = m1 + torch.randn(100_000, d, generator=g, dtype=F64) @ sym_sqrt(S1)
    y = x @ A + b
    torch.testing.assert_close(y.mean(0), m2, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), S2, atol=0.08, rtol=0.02)
    # from the standard normal the map is the symmetric square root of the target covariance
    m, S = random_gaussian(5, seed=3)
    A, b = gaussian_ot_map(torch.zeros(5, dtype=F64), torch.eye(5, dtype=F64), m, S)
    torch.testing.assert_close(A, sym_sqrt(S))
    torch.testing.assert_close(A @ A, S)
    torch.testing.assert_close(b, m)
    eig = torch.linalg.eigvalsh(S)
    assert 0.1 <= eig.min() and eig.max() <= 2.0 and not torch.allclose(S, torch.diag(torch.diagonal(S)))


def test_gaussian_map_in_one_dimension_is_the_quantile_map():
    (m1, s1), (m2, s2) = (0.3, 1.7), (-2.0, 0.4)
    A, b = gaussian_ot_map(torch.tensor([m1]), torch.tensor([[s1**2]]), torch.tensor([m2]), torch.tensor([[s2**2]]))
    x = torch.linspace(-4, 4, 17, dtype=F64)
    quantile = torch.from_numpy(norm.ppf(norm.cdf(x.numpy(), m1, s1), m2, s2))
    torch.testing.assert_close(A[0, 0] * x + b[0], quantile)


def test_minibatch_ot_recovers_the_map_in_low_dimension_only():
    assert pairing_error(1, 1024, 1, seed=0)["error"] < 0.05
    at_64 = [pairing_error(d, 64, 8, seed=0) for d in (1, 8, 32)]
    assert at_64[0]["error"] < at_64[1]["error"] < at_64[2]["error"] < 1
    assert all(0.8 < r["independent"] < 1.2 for r in at_64)
    in_4d = [pairing_error(4, b, max(1, 512 // b), seed=0)["error"] for b in (8, 64, 512)]
    assert in_4d[0] > in_4d[1] > in_4d[2]


def test_needed_batch_interpolates_log_batch_linearly_in_the_error():
    batches, errors = [2, 4, 8, 16], [0.9, 0.6, 0.4, 0.2]
    got = needed_batch(batches, errors, 0.5)
    assert got["bound"] is None and got["batch"] == pytest.approx(4 * math.sqrt(2))
    assert needed_batch(batches, errors, 0.6)["batch"] == pytest.approx(4)
    assert needed_batch(batches, errors, 0.95) == {"batch": 2.0, "bound": "at_most"}
    assert needed_batch(batches, errors, 0.1) == {"batch": None, "bound": None}


def test_growth_fit_tells_exponential_from_power_law():
    dims = [1, 2, 4, 8, 16]
    fit = growth_fit(dims, [3 * 1.5**d for d in dims], unreached=[32])
    e = fit["exponential"]
    assert e["growth_per_dim"] == pytest.approx(1.5) and e["rms_residual_log"] < 1e-9
    assert fit["power"]["rms_residual_log"] > 0.1 and fit["at_least_exponential"] is True
    assert fit["predicted_unreached"]["32"] == pytest.approx(3 * 1.5**32)
    power = growth_fit(dims, [5 * d**2 for d in dims])
    assert power["power"]["p"] == pytest.approx(2) and power["power"]["rms_residual_log"] < 1e-9
    assert power["at_least_exponential"] is False
    few = growth_fit(dims, [None, None, 4.0, None, None])
    assert few["exponential"] is None and few["points"] == 1


def _store(path: Path, generate) -> Path:
    make_pairs(path, generate, n_pairs=64, shard_size=32, data_shape=(1, 4, 4), num_classes=0, seed=3,
               meta={"teacher": {"sha256": "ab" * 32}, "solver": "euler", "steps": 1}, batch_size=32, progress=False)
    return path


def test_pair_store_coupling_at_two_resolutions(tmp_path):
    # x1 = z / 2 is the gradient of a convex function: OT matching recovers every pair at every resolution
    store = _store(tmp_path / "scaled", lambda z, y: 0.5 * z)
    out = pair_store_coupling(store, [2, 8, 32, 64, 128], repeats=2, seed=0, resolutions=[4, 2])
    assert out["skipped_batches"] == [128] and out["resolutions"] == [4, 2]
    assert [(r["resolution"], r["dims"], r["batch"]) for r in out["rows"]] == [
        (4, 16, 2), (2, 4, 2), (4, 16, 8), (2, 4, 8), (4, 16, 32), (2, 4, 32), (4, 16, 64), (2, 4, 64)]
    # matched to the endpoints of other pairs, the noises find partners close to their own in 4 dimensions
    err = {(r["resolution"], r["batch"]): r["independent_error"] for r in out["rows"]}
    assert err[2, 32] < err[2, 2] and err[2, 32] < err[4, 32]
    for r in out["rows"]:
        assert r["own_fraction"] == 1.0 and r["relative_error"] == pytest.approx(0.0, abs=1e-12)
        # 2B pairs fit for every batch but 64 (64 pairs in the store): only there is the independent error missing
        assert (r["independent_error"] is None) == (r["batch"] == 64)
        if r["batch"] != 64:
            assert 0 < r["independent_error"] < 1.5, r
    # a coupling that is not OT (pixels reversed) is only partly recovered, and less so at full resolution
    store = _store(tmp_path / "flipped", lambda z, y: z.flatten(1).flip(1).view_as(z))
    rows = {(r["resolution"], r["batch"]): r for r in pair_store_coupling(store, [32], 2, 0, [4, 2])["rows"]}
    assert rows[4, 32]["own_fraction"] < 1 and rows[4, 32]["relative_error"] > 0
    assert default_resolutions((1, 4, 4)) == [4] and default_resolutions((1, 28, 28)) == [28, 14, 7]
    with pytest.raises(ValueError, match="--resolutions 3"):
        pair_store_coupling(store, [8], 1, 0, [3])


def test_analyze_ot_cli_writes_every_output(tmp_path, capsys):
    store = _store(tmp_path / "pairs", lambda z, y: torch.tanh(z))
    out = tmp_path / "ot"
    assert main(["analyze", "ot", "--dims", "1,2", "--batches", "2,4,8,16", "--repeats", "2", "--threshold",
                 "0.3,0.6", "--pairs", str(store), "--resolutions", "4,2", "--out", str(out)]) == 0
    result = json.loads((out / "ot.json").read_text())
    g = result["gaussian"]
    assert len(g["rows"]) == 8 and [t["threshold"] for t in g["thresholds"]] == [0.3, 0.6]
    assert {r["repeats"] for r in g["rows"] if r["batch"] == 2} == {16}
    assert len(result["pairs"]["rows"]) == 8
    assert (out / "ot.md").read_text() == result["markdown"] and "| d \\ B |" in result["markdown"]
    for name in ("ot_error.svg", "ot_needed.svg", "ot_pairs.svg", "ot_pairs_independent.svg"):
        assert (out / name).read_text().startswith("<svg")
    capsys.readouterr()
    for bad, flag in ((["--dims", "0,2"], "--dims"), (["--batches", "1,4"], "--batches"),
                      (["--threshold", "1.5"], "--threshold"), (["--repeats", "x"], "--repeats"),
                      (["--pairs", str(tmp_path / "none")], "--pairs"), (["--resolutions", "7"], "--resolutions")):
        assert main(["analyze", "ot", *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lmm: error: {flag}") and err.count("\n") == 1, err


def test_analyze_help_documents_every_option(capsys):
    parser = build_parser()
    for command in ("ot", "singularity"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["analyze", command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices["analyze"]._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.dest} has no help text"
            for flag in action.option_strings:
                assert flag in text


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("analysis") / "run"
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, *TOY_RUN, f"run.dir={run}"]) == 0
    return run


def test_singularity_on_a_tiny_run(toy_run, tmp_path, capsys):
    from lmm.report import build_report

    assert main(["analyze", "singularity", str(toy_run), "--n", "128", "--steps", "8"]) == 0
    result = json.loads((toy_run / "analysis" / "singularity.json").read_text())
    times = result["times"]
    assert times[0] == 0.0 and len(times) == 13 and result["n"] == 128
    for role in ("teacher", "student"):
        r = result[role]
        for key in ("dist_to_mean", "pixel_std", "dist_to_mean_rel", "pixel_std_rel"):
            assert len(r[key]) == len(times) and all(v >= 0 for v in r[key])
        assert set(r["sample"]) == {"dist_to_mean", "pixel_std", "dist_to_mean_rel", "pixel_std_rel"}
    teacher = result["teacher"]
    # the teacher's endpoint prediction from pure noise sits near the data mean and hardly varies with the noise
    assert teacher["dist_to_mean_rel"][0] < 1 and teacher["pixel_std_rel"][0] < 1
    assert teacher["pixel_std_rel"][0] < teacher["pixel_std_rel"][-1]
    assert teacher["straightness"] > 0 and teacher["straightness_rel"] > 0
    for name in ("singularity.svg", "singularity_logt.svg"):
        assert (toy_run / "analysis" / name).read_text().startswith("<svg")
    assert "Endpoint collapse near the noise end" in build_report(toy_run).read_text()
    # a run folder with the student alone is analysed; one with neither model is refused in one line
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(toy_run / "config.json", alone / "config.json")
    capsys.readouterr()
    assert main(["analyze", "singularity", str(alone)]) == 2
    err = capsys.readouterr().err
    assert "neither teacher" in err and err.count("\n") == 1
    shutil.copytree(toy_run / "student", alone / "student")
    assert main(["analyze", "singularity", str(alone), "--n", "64"]) == 0
    only = json.loads((alone / "analysis" / "singularity.json").read_text())
    assert only["teacher"] is None and len(only["student"]["pixel_std_rel"]) == 13
    assert main(["analyze", "singularity", str(alone), "--n", "1"]) == 2
    assert capsys.readouterr().err.startswith("lmm: error: --n")
