"""The linear-regime figure: per multiple eta of the actual step, each estimator's tightness and the residual shares.

Input: the two tables of ``entropy_lab.analyses.regime.regime_table``. Three panels over a log
eta axis: Pearson of each estimator against the measured change at theta + eta dtheta; its
least-squares gain (1 means right in scale); the shares of curvature and coupling in the
measured change (curvature falls as eta -> 0, coupling does not).

Simplification: one traced update per figure (the tables pool its tokens).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from .style import colors, new_figure, no_data, styled


def linear_regime_figure(tightness: pd.DataFrame, shares: pd.DataFrame) -> Figure:
    """Pearson, gain and residual shares against eta (log axis)."""
    with styled():
        fig, (ax_r, ax_g, ax_s) = new_figure(3)
        if tightness.empty:
            for ax in (ax_r, ax_g, ax_s):
                no_data(ax)
            return fig
        palette = colors(tightness["estimator"])
        for name, part in tightness.groupby("estimator", sort=False):
            part = part.sort_values("eta")
            ax_r.plot(part["eta"], part["pearson"], marker="o", ms=3, label=name, color=palette[name])
            ax_g.plot(part["eta"], part["gain"], marker="o", ms=3, label=name, color=palette[name])
        ax_g.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax_r.set(xscale="log", xlabel="eta (multiple of the step)", ylabel="Pearson vs measured dH")
        ax_g.set(
            xscale="log",
            # gains span 1 (jvp) to ~1e5 (tabular forms under Adam): log where all are positive
            yscale="log" if bool((tightness["gain"].dropna() > 0).all()) else "symlog",
            xlabel="eta (multiple of the step)",
            ylabel="gain (1 = right scale)",
        )
        ax_r.legend(fontsize=7)
        shares = shares.sort_values("eta")
        labels = {
            "curvature": "curvature",
            "coupling_raw": "coupling (raw)",
            "coupling_calibrated": "coupling (calibrated)",
        }
        for col, label in labels.items():
            if col in shares:
                ax_s.plot(shares["eta"], shares[col], marker="o", ms=3, label=label)
        ax_s.set(
            xscale="log",
            yscale="log",
            xlabel="eta (multiple of the step)",
            ylabel="share of ||measured dH||^2",
        )
        ax_s.legend(fontsize=7)
        fig.suptitle("The linear regime along the actual update direction")
        return fig
