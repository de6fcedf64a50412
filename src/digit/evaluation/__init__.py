"""Evaluation: distribution metrics with provenance (fid.py, features.py, stats.py, images.py) and linear probes (probe.py).

Heavy libraries (torch, torch-fidelity, scipy) are imported inside functions so importing this package stays cheap.
"""

from digit.evaluation.fid import compute_metrics, evaluate, feature_statistics, frechet_distance, reference_stats

__all__ = ["compute_metrics", "evaluate", "feature_statistics", "frechet_distance", "reference_stats"]
