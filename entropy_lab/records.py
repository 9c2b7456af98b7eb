"""The trace record: one row per traced response token (docs/theory.md section 10).

Column names are a public contract. A trace file is Parquet, one per traced update
(or per step), with the run configuration as JSON in the file's schema metadata.
The ``predicted`` group lists the built-in estimators' columns, which every record
has; records may carry more columns: one ``omega_<name>`` per further registered
estimator, the ``regime@<eta>:<quantity>`` columns of an eta sweep, the
``attr_<kind>:<part>`` columns of an attribution (``attribution_column``: each part's
additive contribution to ``omega_jvp``, in nats), and any other column a producer adds. Readers find the predicted columns with ``predicted_columns``.

The constants both sides of the contract share live here too, torch-free: the four
factors of the closed form (``FACTORS``) and the sign(A) x sign(l_a) quadrants with their
first-order direction (``QUADRANTS``, ``THEORY_SIGN``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from entropy_lab.errors import EntropyLabError

COLUMN_GROUPS: dict[str, tuple[str, ...]] = {
    "where": ("step", "update", "sample", "position", "token_id"),
    "objective": (
        "advantage",
        "ratio",
        "clip_indicator",
        "intervention_weight",
        "normalizer",
        "weight",
        "lr",
    ),
    "distribution": ("prob", "logprob", "surprisal", "entropy_before", "entropy_after", "collision"),
    "measured": ("delta_entropy", "delta_logit_linear"),
    "predicted": (
        "omega_paper",
        "omega_sampled_logit",
        "omega_softmax",
        "omega_logit_grad",
        "omega_covariance",
    ),
}
COLUMNS: tuple[str, ...] = tuple(c for group in COLUMN_GROUPS.values() for c in group)
INT_COLUMNS = ("step", "update", "sample", "position", "token_id")
METADATA_KEY = b"entropy_lab"
PREDICTED_PREFIX = "omega_"

FACTORS: dict[str, str] = {
    "weight": "weight",
    "probability": "prob",
    "surprisal": "surprisal",
    "entropy": "entropy_before",
}
"""The four factors of the closed form (docs/theory.md sections 1-3): factor name -> record column."""

QUADRANTS: tuple[tuple[str, int, int, str], ...] = (
    ("A>0, l>0", 1, 1, "falls"),
    ("A>0, l<0", 1, -1, "rises"),
    ("A<0, l>0", -1, 1, "rises"),
    ("A<0, l<0", -1, -1, "falls"),
    ("A=0", 0, 0, "flat"),
)
"""(label, sign of A, sign of l_a = log pi_a + H, first-order direction of the entropy change)."""

THEORY_SIGN: dict[str, float] = {"falls": -1.0, "rises": 1.0}
"""Sign of the entropy change each quadrant's first-order direction predicts ("flat" has none)."""

REGIME_COLUMN = re.compile(r"^regime@(?P<eta>[^:]+):(?P<quantity>\w+)$")
"""Matches a column of ``regime_column``; groups ``eta`` and ``quantity`` (an eta sweep records
``delta_entropy``, ``delta_logit_linear`` and ``jvp_entropy`` per eta)."""


def predicted_column(estimator: str) -> str:
    """Record column of an estimator: 'sampled-logit' -> 'omega_sampled_logit'."""
    return PREDICTED_PREFIX + estimator.replace("-", "_")


def estimator_name(column: str) -> str:
    """The estimator of a predicted column: 'omega_sampled_logit' -> 'sampled-logit'."""
    return column.removeprefix(PREDICTED_PREFIX).replace("_", "-")


def regime_column(eta: float, quantity: str) -> str:
    """Record column of one eta-sweep quantity: (0.25, 'delta_entropy') -> 'regime@0.25:delta_entropy'."""
    return f"regime@{eta!r}:{quantity}"


ATTRIBUTION_COLUMN = re.compile(r"^attr_(?P<kind>\w+):(?P<part>.+)$")
"""Matches a column of ``attribution_column``; groups ``kind`` (layer, source) and ``part``."""


def attribution_column(kind: str, part: str) -> str:
    """Record column of one attribution part: ('layer', 'block0.mlp') -> 'attr_layer:block0.mlp'."""
    return f"attr_{kind}:{part}"


def attribution_columns(columns, kind: str) -> dict[str, str]:
    """Part -> column for every ``attr_<kind>:<part>`` column among ``columns``, in their order."""
    found = (ATTRIBUTION_COLUMN.match(str(c)) for c in columns)
    return {m["part"]: m.group(0) for m in found if m is not None and m["kind"] == kind}


def predicted_columns(columns) -> list[str]:
    """The ``omega_*`` columns among ``columns`` (a frame or names): built-ins in contract order, then the rest."""
    present = [str(c) for c in columns if str(c).startswith(PREDICTED_PREFIX)]
    builtin = [c for c in COLUMN_GROUPS["predicted"] if c in present]
    return builtin + [c for c in present if c not in builtin]


def validate_records(df: pd.DataFrame, source: str = "records") -> pd.DataFrame:
    """Raise one clear error if a contract column is missing; return ``df`` unchanged (extra columns are fine)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise EntropyLabError(f"{source} lacks trace column(s): {', '.join(missing)}")
    return df


def save_records(df: pd.DataFrame, path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``df`` to Parquet with ``config`` (JSON) in the file metadata, atomically."""
    validate_records(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(config or {}, default=str).encode()
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)
    return path


def load_records(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a trace file: (records, config). Missing columns or a non-Parquet file give one error."""
    path = Path(path)
    if not path.is_file():
        raise EntropyLabError(f"no trace file at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EntropyLabError(f"{path} is not a readable Parquet trace file ({exc})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"{}")
    df = table.to_pandas()
    validate_records(df, source=str(path))
    try:  # the metadata is data: parsed as JSON, never evaluated
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError
    except ValueError:
        raise EntropyLabError(
            f"{path} has unreadable entropy_lab metadata (not a JSON object); rewrite the file with save_records"
        ) from None
    return df, config
