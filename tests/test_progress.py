"""Progress output without a terminal: whole lines at an interval, each bar labelled once."""
import io
import os
import subprocess
import sys

import lmm.progress as progress_mod
from lmm.progress import LineProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_writer_respects_interval_and_closes_with_a_final_line(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    out = io.StringIO()
    bar = LineProgress(100, desc="pairs", unit="pair", interval=30.0, file=out)
    bar.update(10)
    clock.now += 10
    bar.update(10)
    assert out.getvalue() == ""
    clock.now += 20
    bar.set_postfix(loss=0.123456, samples_s="300")
    bar.update(20)
    assert out.getvalue() == "pairs: 40/100 pair (40%), 1.33 pair/s, eta 45s [loss=0.1235, samples_s=300]\n"
    clock.now += 29
    bar.update(10)
    assert out.getvalue().count("\n") == 1
    clock.now += 1
    bar.update(0)
    assert out.getvalue().count("\n") == 2
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("pairs: 50/100 pair (50%), ") and "in 1m00s" in lines[-1]
    assert "\r" not in out.getvalue()


def test_line_writer_iterates_and_stays_silent_when_disabled(monkeypatch):
    out = io.StringIO()
    assert list(LineProgress(desc="x", iterable=range(3), interval=0.0, file=out)) == [0, 1, 2]
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == [
        "x: 1/3 it (33%)", "x: 2/3 it (67%)", "x: 3/3 it (100%)", "x: 3/3 it (100%)"]
    silent = io.StringIO()
    with LineProgress(5, desc="y", enabled=False, interval=0.0, file=silent) as bar:
        bar.update(5)
    assert list(LineProgress(desc="z", enabled=False, iterable="ab", file=silent)) == ["a", "b"]
    assert silent.getvalue() == ""
    monkeypatch.setenv("LMM_PROGRESS_INTERVAL", "2.5")
    assert isinstance(progress_bar(3, desc="w"), LineProgress)  # pytest's stderr is not a terminal
    assert progress_bar(3, desc="w").interval == 2.5


def test_cli_progress_without_a_terminal_is_plain_lines(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMM_PROGRESS_INTERVAL": "0"}
    common = [f"run.dir={tmp_path / 'run'}", "teacher.net.channels=8", "run.progress=true", "teacher.train.steps=3",
              "teacher.train.batch_size=16", "teacher.train.log_every=1", "teacher.train.ckpt_every=3",
              "teacher.steps=2", "pairs.n=96", "pairs.shard_size=64", "pairs.batch_size=64"]
    errs = {}
    for stage in (["teacher", "train"], ["pairs"]):
        done = subprocess.run([sys.executable, "-m", "lmm.cli.main", *stage, *common], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        errs[stage[0]] = done.stderr.decode()
    for err in errs.values():
        assert "\r" not in err and len(err) < 2000
    train = errs["teacher"].splitlines()
    assert len(train) == 4 and all(line.startswith("train teacher: ") for line in train)
    assert train[-1].startswith("train teacher: 3/3 it (100%)") and "[loss=" in train[-1]
    pairs = errs["pairs"].splitlines()
    assert pairs[-1].startswith("pairs: 96/96 pair (100%)")
    assert all(line.startswith("pairs: ") for line in pairs) and "pairs pairs" not in errs["pairs"]
