"""AToP study analysis: MLflow runs -> Arrow table / Parquet -> Pareto fronts -> figures, report.

The pipeline is load (``analysis.load``) -> compute (``analysis.compute``) -> draw
(``analysis.draw``) and report (``analysis.report``); ``python -m analysis`` runs all of it.
"""

from analysis.errors import AnalysisError

__all__ = ["AnalysisError"]
