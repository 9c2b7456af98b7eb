"""Write a figure as PNG and PDF.

Each file is written under a temporary name and renamed into place, and only where no file
is in the way that entropy-lab did not write (``entropy_lab.run_files``: the folder's ledger
of written files); every file written is added to that ledger.

Simplification: one fixed PNG resolution (``PNG_DPI``), chosen for small files that still
read well in a report; dense artists (hexbins) are rasterised in the PDF by the plotting
functions themselves. Axis labels longer than their axes are broken onto two lines first
(``style.fit_labels``).
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from entropy_lab.run_files import check_replaceable, record_written

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

    Raises:
        EntropyLabError: a file entropy-lab did not write holds one of the names (nothing is written).
    """
    base = Path(path)
    if base.suffix.lower() in SUFFIXES:
        base = base.with_suffix("")
    written = [base.parent / f"{base.name}{suffix}" for suffix in SUFFIXES]
    try:
        check_replaceable(written)
        fit_labels(fig)
        base.parent.mkdir(parents=True, exist_ok=True)
        for target in written:
            tmp = target.with_name(target.name + ".tmp")
            fig.savefig(tmp, dpi=PNG_DPI if target.suffix == ".png" else None, format=target.suffix[1:])
            os.replace(tmp, target)
        record_written(written)
    finally:
        _close(fig)
    return written


def _close(fig: Figure) -> None:
    # Figures built by entropy_lab.figures never enter pyplot; one a user made with
    # pyplot must be released there too, or it stays referenced.
    import matplotlib.pyplot as plt

    plt.close(fig)
