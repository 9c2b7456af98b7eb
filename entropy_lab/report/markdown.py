"""Markdown for reports: tables of DataFrames and image links to written figures.

Tables are written by a small helper (``markdown_table``), so ``tabulate`` is not required.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from entropy_lab.formatting import DIGITS, format_number

PRECISE_DIGITS = 4
PRECISE_COLUMNS = ("pearson", "spearman", "r2", "sign_agreement", "theory_agreement")
"""Scores whose differences near 1 matter (0.9995 vs 0.99): shown with ``PRECISE_DIGITS``."""


def _cell(value: Any, digits: int) -> str:
    return format_number(value, digits).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int | Mapping[str, int] | None = None
) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (numeric columns right-aligned).

    Naive equivalent: ``frame[columns].to_markdown(index=False)``, which needs ``tabulate``.

    Args:
        frame: the table.
        columns: columns to show, in order; ones ``frame`` lacks are skipped. None = all.
        digits: significant digits of floats, one number or per column; None = ``table_digits``
            (``DIGITS``, and ``PRECISE_DIGITS`` for correlations, R² and agreement).
    """
    names = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    if not names:
        return "_(empty table)_"
    digits = table_digits(frame) if digits is None else digits
    per_column = {n: digits.get(n, DIGITS) if isinstance(digits, Mapping) else digits for n in names}
    numeric = [
        pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in names
    ]
    lines = [
        "| " + " | ".join(_cell(name, DIGITS) for name in names) + " |",
        "| " + " | ".join("---:" if is_num else "---" for is_num in numeric) + " |",
    ]
    for row in frame[names].itertuples(index=False, name=None):
        cells = (_cell(value, per_column[name]) for name, value in zip(names, row, strict=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_digits(frame: pd.DataFrame) -> dict[str, int]:
    """Digits per column: ``PRECISE_DIGITS`` for bounded scores near 1 (correlations, R², agreement)."""
    return {c: PRECISE_DIGITS if c in PRECISE_COLUMNS else DIGITS for c in frame.columns}


def figure_links(paths: Sequence[Path], base: Path) -> dict[str, str]:
    """Stem -> markdown image link relative to ``base``, for the PNG files among ``paths``."""
    links = {}
    for path in paths:
        if path.suffix == ".png":
            relative = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
            links[path.stem] = f"![{path.stem.replace('_', ' ')}]({relative})"
    return links
