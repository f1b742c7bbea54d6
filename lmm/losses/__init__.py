"""Loss terms behind one interface (lmm.losses.base.LossTerm), combined by a weighted sum from the config
(`student.loss = {l2 = 1.0, perceptual = 1.0, adversarial = 0.1}`), registered in LOSSES by name; a term's
`Options` become the config table `student.<name>`. Adding a term: one file and `LOSSES.register(name, cls)`
(here for lmm's own, in a plugin module for others: lmm.plugins)."""
from __future__ import annotations

from lmm.losses.adversarial import Adversarial
from lmm.losses.base import LossTerm
from lmm.losses.l2 import L2, l2
from lmm.losses.perceptual import Perceptual
from lmm.losses.pseudo_huber import PseudoHuber, pseudo_huber, pseudo_huber_c
from lmm.registry import Registry

LOSSES: Registry[LossTerm] = Registry("loss term", "student.loss", options_at="student")
for _cls in (L2, PseudoHuber, Perceptual, Adversarial):
    LOSSES.register(_cls.name, _cls)


def check_loss(loss: dict[str, float]) -> dict[str, float]:
    """{term: weight} with known terms and weights >= 0; zero weights dropped; at least one term left."""
    if not isinstance(loss, dict):
        raise ValueError(f"student.loss must be a table {{term = weight}}, got {loss!r}")
    unknown = sorted(set(loss) - set(LOSSES))
    if unknown:
        raise ValueError(f"student.loss: unknown term(s) {unknown}; valid: {', '.join(LOSSES)}")
    bad = {k: w for k, w in loss.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise ValueError(f"student.loss: weights must be numbers >= 0, got {bad}")
    kept = {k: float(w) for k, w in loss.items() if w > 0}
    if not kept:
        raise ValueError(f"student.loss: every weight is 0 in {loss}; give at least one term a positive weight")
    return kept


__all__ = ["LOSSES", "LossTerm", "L2", "PseudoHuber", "Perceptual", "Adversarial", "check_loss", "l2",
           "pseudo_huber", "pseudo_huber_c"]
