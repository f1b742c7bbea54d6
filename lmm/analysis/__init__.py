"""The paper's analyses: the curse of dimensionality of mini-batch OT pairing (`ot`) and the collapse of endpoint
predictions toward the data mean near the noise end (`singularity`)."""

from lmm.analysis.ot import (
    gaussian_ot_map,
    gaussian_pairing_grid,
    growth_fit,
    needed_batch,
    pair_store_coupling,
    random_gaussian,
    run_ot_analysis,
)
from lmm.analysis.singularity import analyze_singularity

__all__ = ["analyze_singularity", "gaussian_ot_map", "gaussian_pairing_grid", "growth_fit", "needed_batch",
           "pair_store_coupling", "random_gaussian", "run_ot_analysis"]
