"""`python -m bench`: each figure ours against a baseline measured in the same process, as ratios.

Rows live in their own modules and register with `@bench.core.row("name")`; importing this
package registers them in table order (FT step and share of peak, attack throughput, samplers, MO-ASHA
against no stopping on a simulated clock, then the study rows).
"""
from bench import attack, ft_step, moasha, samplers, study_rows  # noqa: F401  (registers the rows, in this order)
from bench.core import ROWS, TINY, Context, Result, Sizes, row

__all__ = ["ROWS", "TINY", "Context", "Result", "Sizes", "row"]
