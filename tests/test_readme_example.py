"""The README's Python example, as written there, run against a tiny student trained in a temporary folder."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lmm.cli.main import main

README = Path(__file__).parent.parent / "README.md"
HEADING = "## From Python"
TINY = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.steps=2", "pairs.n=64", "pairs.shard_size=32",
        "pairs.batch_size=32", "student.train.steps=4", "student.train.batch_size=16"]

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_example() -> str:
    """The first ```python block of the README section under HEADING."""
    section = README.read_text().split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert found, f"no python block under {HEADING!r} in {README}"
    return found[1]


def test_readme_example_samples_16_images(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, f"run.dir={run}", *TINY]) == 0
    code, substituted = re.subn(r"^student = .*$", f"student = {str(run / 'student')!r}", readme_example(),
                                flags=re.M)
    assert substituted == 1, "the example must set `student = PATH` on a line of its own"
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    exec(compile(code, str(README), "exec"), {})
    (npz,) = out.glob("*.npz")
    images = np.load(npz)["images"]
    assert images.shape[0] == 16 and images.ndim == 4 and images.dtype == np.uint8
    assert npz.with_suffix(".png").is_file()
