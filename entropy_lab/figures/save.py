"""Write a figure as PNG and PDF.

Simplification: one fixed PNG resolution (``PNG_DPI``), chosen for small files that still
read well in a report; dense artists (hexbins) are rasterised in the PDF by the plotting
functions themselves. Axis labels longer than their axes are broken onto two lines first
(``style.fit_labels``).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .style import fit_labels

PNG_DPI = 130
SUFFIXES = (".png", ".pdf")


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Save ``fig`` to ``<path>.png`` and ``<path>.pdf``, then close it.

    Args:
        fig: the figure; closed afterwards (also removed from pyplot if pyplot made it).
        path: destination without suffix; parent folders are created. A trailing ``.png`` or
            ``.pdf`` is dropped rather than doubled.

    Returns:
        The written paths, PNG first.
    """
    base = Path(path)
    if base.suffix.lower() in SUFFIXES:
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    fit_labels(fig)
    written = []
    for suffix in SUFFIXES:
        target = base.parent / f"{base.name}{suffix}"
        fig.savefig(target, dpi=PNG_DPI if suffix == ".png" else None)
        written.append(target)
    _close(fig)
    return written


def _close(fig: Figure) -> None:
    # Figures built by entropy_lab.figures never enter pyplot; one a user made with
    # pyplot must be released there too, or it stays referenced.
    import matplotlib.pyplot as plt

    plt.close(fig)
