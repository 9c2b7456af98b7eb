"""entropy_lab.figures: plotting functions, DataFrames in, matplotlib Figures out.

Figures are built on an Agg canvas without pyplot (``figures.style``), so importing this
package neither switches the user's backend nor changes global rcParams. Every axis
label states its unit and whether it is token-level, batch-level or problem-level.

- ``theory``: measured vs predicted, residual bins, quadrants, tightness per step.
- ``decomposition``: the calibrated decomposition and the coupling study.
- ``training``: training curves, entropy-change spread, pass@k, intervention weights,
  entropy by position and step.
- ``save``: ``save_figure`` writes PNG and PDF.
"""

from .decomposition import coupling_study_figure, decomposition_bar
from .save import save_figure
from .theory import (
    measured_vs_predicted,
    quadrant_heatmap,
    residuals_by_factor_panels,
    tightness_over_steps,
)
from .training import (
    entropy_by_position,
    entropy_change_distribution,
    pass_at_k_curves,
    steer_weight_distribution,
    training_curves,
)

__all__ = [
    "coupling_study_figure",
    "decomposition_bar",
    "entropy_by_position",
    "entropy_change_distribution",
    "measured_vs_predicted",
    "pass_at_k_curves",
    "quadrant_heatmap",
    "residuals_by_factor_panels",
    "save_figure",
    "steer_weight_distribution",
    "tightness_over_steps",
    "training_curves",
]
