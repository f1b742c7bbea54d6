import json
import shutil
from pathlib import Path

import pytest
import torch

from lmm.pairs import PairSource, make_pairs, open_pairs, shard_seed

SHAPE = (2, 3)
N, SHARD, CLASSES = 50, 8, 3
META = {
    "teacher": {"sha256": "aa" * 32, "kind": "flow", "config": {"width": 16}},
    "solver": "heun",
    "steps": 4,
    "nfe": 8,
    "grid": [0.0, 0.25, 0.5, 0.75, 1.0],
}


def teacher(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    shift = 0.0 if y is None else 0.1 * y.float().view(-1, *([1] * (z.ndim - 1)))
    return torch.tanh(z) * 0.5 + shift


class Counting:
    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, z, y):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated kill")
        self.calls += 1
        return teacher(z, y)


def build(store, gen=teacher, **kw):
    args = dict(
        n_pairs=N, shard_size=SHARD, data_shape=SHAPE, num_classes=CLASSES, seed=7, meta=META,
        batch_size=SHARD, progress=False,
    )
    args.update(kw)
    return make_pairs(store, gen, **args)


def shas(store: Path) -> list[str]:
    return [r["sha256"] for r in open_pairs(store).shards]


def test_store_reproducible_from_seeds(tmp_path):
    report = build(tmp_path / "a", batch_size=3)
    assert report.complete and report.generated == list(range(7)) and not report.skipped
    build(tmp_path / "b")
    assert shas(tmp_path / "a") == shas(tmp_path / "b")
    store = open_pairs(tmp_path / "a")
    assert len(store) == N and store.num_shards == 7 and store.shards[-1]["n"] == 2
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["teacher"] == META["teacher"] and m["grid"] == META["grid"] and m["dtype"] == "float32"
    assert m["data_shape"] == list(SHAPE) and m["n_pairs"] == N and len(m["shards"]) == 7
    for k, s in store.iter_shards():
        g = torch.Generator().manual_seed(shard_seed(7, k))
        z = torch.randn((s["z"].shape[0], *SHAPE), generator=g)
        y = torch.randint(0, CLASSES, (z.shape[0],), generator=g)
        assert torch.equal(s["z"], z) and torch.equal(s["y"], y)
        assert torch.equal(s["x1"], teacher(z, y))
    assert build(tmp_path / "c", seed=8).complete and shas(tmp_path / "c") != shas(tmp_path / "a")


def test_resume_after_kill_generates_only_missing_shards(tmp_path):
    store = tmp_path / "s"
    with pytest.raises(RuntimeError, match="simulated kill"):
        build(store, Counting(fail_after=3))
    (store / ".shard-00003.safetensors.x1y2.tmp").write_bytes(b"half written")  # as lmm.io.atomic_path names it
    with pytest.raises(ValueError, match="incomplete: 4 of 7"):
        open_pairs(store)
    gen = Counting()
    report = build(store, gen)
    assert gen.calls == 4 and report.generated == [3, 4, 5, 6] and report.skipped == [0, 1, 2]
    assert not list(store.glob("*.tmp"))
    build(tmp_path / "ref")
    assert shas(store) == shas(tmp_path / "ref")
    (store / "shard-00005.json").unlink()
    m = json.loads((store / "manifest.json").read_text())
    m["shards"] = [r for r in m["shards"] if r["index"] != 5]
    (store / "manifest.json").write_text(json.dumps(m))
    gen = Counting()
    assert build(store, gen).generated == [5] and gen.calls == 1
    assert shas(store) == shas(tmp_path / "ref")


def test_two_ranks_make_the_same_store_as_one(tmp_path):
    build(tmp_path / "one")
    r0 = build(tmp_path / "two", rank=0, world=2)
    assert r0.generated == [0, 2, 4, 6] and not r0.complete
    r1 = build(tmp_path / "two", rank=1, world=2)
    assert r1.generated == [1, 3, 5] and r1.complete
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1 == m2
    (tmp_path / "two" / "manifest.json").write_text(json.dumps({**m2, "shards": m2["shards"][:2]}))
    assert shas(tmp_path / "two") == shas(tmp_path / "one")


def test_corrupted_shard_is_refused_then_repaired(tmp_path):
    store = tmp_path / "s"
    build(store)
    good = shas(store)
    path = store / "shard-00002.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00002.safetensors is corrupted"):
        open_pairs(store)
    with pytest.raises(ValueError, match="shard-00002.safetensors is corrupted.*repair=True"):
        build(store)
    gen = Counting()
    assert build(store, gen, repair=True).generated == [2] and gen.calls == 1
    assert shas(store) == good
    (store / "shard-00004.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00004.safetensors is missing"):
        open_pairs(store)


def test_foreign_meta_is_refused(tmp_path):
    store = tmp_path / "s"
    build(store)
    other = {**META, "teacher": {**META["teacher"], "sha256": "bb" * 32}}
    with pytest.raises(ValueError, match="teacher.sha256='aaaa.*'bbbb.*refusing to mix"):
        build(store, meta=other)
    with pytest.raises(ValueError, match="steps=4, but 5"):
        build(store, meta={**META, "steps": 5})
    with pytest.raises(ValueError, match="shard_size=8, but 10"):
        build(store, shard_size=10)
    with pytest.raises(ValueError, match="dtype='float32', but 'float16'"):
        build(store, dtype="float16")
    foreign = tmp_path / "f"
    foreign.mkdir()
    shutil.copy(store / "shard-00000.json", foreign / "shard-00000.json")
    with pytest.raises(ValueError, match="shard-00000.json belongs to a different pair store"):
        build(foreign, meta=other)
    with pytest.raises(ValueError, match="reserved key"):
        build(tmp_path / "r", meta={**META, "seed": 1})


def test_generate_errors_name_the_shard(tmp_path):
    with pytest.raises(ValueError, match="non-finite x1.*shard-00000.safetensors"):
        build(tmp_path / "a", gen=lambda z, y: z / 0.0)
    with pytest.raises(ValueError, match="shape"):
        build(tmp_path / "b", gen=lambda z, y: z[:, :1])


def test_float16_store(tmp_path):
    build(tmp_path / "h", dtype="float16", num_classes=0)
    store = open_pairs(tmp_path / "h")
    _, s = next(store.iter_shards())
    assert s["z"].dtype == torch.float16 and "y" not in s
    assert torch.equal(s["x1"], teacher(s["z"].float(), None).half())
    b = PairSource(tmp_path / "h", seed=0).batch(0, 0, 1, 5)
    assert b["z"].dtype == torch.float32 and b.keys() == {"z", "x1"}


def test_pair_source_streams_each_pair_once_per_epoch(tmp_path):
    build(tmp_path / "s")
    store = open_pairs(tmp_path / "s")
    shard_of = {}
    for k, s in store.iter_shards():
        for v in s["z"][:, 0, 0].tolist():
            shard_of[v] = k
    src = PairSource(tmp_path / "s", seed=3, window=2)
    b = 7
    batches = [src.batch(step, 0, 1, b) for step in range(3 * N // b + 1)]
    assert src._win_data["z"].shape[0] <= 2 * SHARD
    stream = torch.cat([x["z"][:, 0, 0] for x in batches])[: 3 * N]
    for e in range(3):
        ids = stream[e * N : (e + 1) * N].tolist()
        assert sorted(ids) == sorted(shard_of)
        src._layout(e)
        for w in range(len(src._starts) - 1):
            window = ids[src._starts[w] : src._starts[w + 1]]
            assert len({shard_of[v] for v in window}) <= 2
        switches = sum(shard_of[u] != shard_of[v] for u, v in zip(ids, ids[1:]))
        assert switches > 2 * store.num_shards
    assert stream[:N].tolist() != stream[N : 2 * N].tolist()
    for x in batches:
        assert torch.equal(x["x1"], teacher(x["z"], x["y"])) and x["y"].dtype == torch.int64
    again = PairSource(tmp_path / "s", seed=3, window=2)
    for step in (9, 2, 14):
        one = again.batch(step, 0, 1, b)
        assert torch.equal(one["z"], batches[step]["z"])
        two = [src.batch(step, r, 2, 4) for r in (0, 1)]
        assert torch.equal(torch.cat([t["z"] for t in two]), again.batch(step, 0, 1, 8)["z"])
    assert len(src) == N
