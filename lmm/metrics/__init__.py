"""Evaluation metrics: Frechet distances (FID / proxy / pixel), precision-recall, nearest neighbours, straightness,
endpoint drift."""

from lmm.metrics.features import (
                                  EXTRACTORS,
                                  FeatureExtractor,
                                  InceptionFeatures,
                                  PixelFeatures,
                                  ProxyFeatures,
                                  get_extractor,
)
from lmm.metrics.frechet import FeatureStats, frechet_distance, frechet_distance_stats
from lmm.metrics.prdc import knn_radii, nearest_rows, precision_recall, subset_indices
from lmm.metrics.reference import (
                                  compute_stats,
                                  hash_images,
                                  load_stats,
                                  read_meta,
                                  save_stats,
)
from lmm.metrics.straightness import endpoint_consistency, endpoint_spread, straightness

__all__ = ["EXTRACTORS", "FeatureExtractor", "FeatureStats", "InceptionFeatures", "PixelFeatures", "ProxyFeatures",
           "compute_stats", "endpoint_consistency", "endpoint_spread", "frechet_distance", "frechet_distance_stats",
           "get_extractor", "hash_images", "knn_radii", "load_stats", "nearest_rows", "precision_recall", "read_meta",
           "save_stats", "straightness", "subset_indices"]
