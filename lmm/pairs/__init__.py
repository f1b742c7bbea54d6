"""The pair store: (z, x1) pairs from a teacher, sharded, resumable, checksummed and reproducible from seeds.

format (the files and their checks), writer (make_pairs), reader (open_pairs, PairStore, PairSource).
"""
from lmm.pairs.format import FORMAT_VERSION, MANIFEST, shard_name, shard_seed, sidecar_name
from lmm.pairs.reader import PairSource, PairStore, open_pairs
from lmm.pairs.writer import PairsReport, make_pairs

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PairSource",
    "PairStore",
    "PairsReport",
    "make_pairs",
    "open_pairs",
    "shard_name",
    "shard_seed",
    "sidecar_name",
]
