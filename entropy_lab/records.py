"""The trace record: one row per traced response token (docs/theory.md section 10).

Column names are a public contract, and so are their dtypes and bounds (``validate_records``,
checked on every save and load: a trace file is untrusted data). A trace file is Parquet, one
per traced update (or per step), with the run configuration as JSON in the file's schema metadata.
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
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from entropy_lab.errors import EntropyLabError
from entropy_lab.untrusted import check_numeric, parse_json, read_parquet

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


MAX_ENTROPY = math.log(2.0**32)
"""Largest entropy of any next-token distribution, in nats: no vocabulary has 2**32 tokens."""
RANGE_SLACK = 1e-3
"""Rounding the range checks allow (an fp32 entropy of a near-certain token can be -1e-7)."""

VALUE_RULES: dict[str, tuple[float, float, bool]] = {
    "step": (0, math.inf, True),
    "update": (0, math.inf, True),
    "sample": (0, math.inf, True),
    "position": (0, math.inf, True),
    "token_id": (0, math.inf, True),
    "prob": (0.0, 1.0, True),
    "logprob": (-math.inf, 0.0, True),
    "surprisal": (0.0, math.inf, True),
    "entropy_before": (0.0, MAX_ENTROPY, True),
    "entropy_after": (0.0, MAX_ENTROPY, True),
    "collision": (-math.inf, math.inf, True),
    "delta_entropy": (-MAX_ENTROPY, MAX_ENTROPY, True),
}
"""Column -> (lowest, highest, NaN refused) for the columns with bounds (mathematical, not empirical).
Every other contract column, and every ``omega_*`` and ``regime@*`` column, is a float that may be
NaN (not measured: no advantage given, no gradient captured) and is never infinite."""


def _float_columns(columns) -> list[str]:
    """The columns a record's reader does arithmetic on: contract floats, estimators, eta-sweep columns."""
    return [
        str(c)
        for c in columns
        if (str(c) in COLUMNS and str(c) not in INT_COLUMNS)
        or str(c).startswith(PREDICTED_PREFIX)
        or REGIME_COLUMN.match(str(c))
    ]


def validate_records(df: pd.DataFrame, source: str = "records") -> pd.DataFrame:
    """Raise one clear error unless ``df`` keeps the contract; return ``df`` unchanged.

    The contract: at least one row; every contract column present; ``INT_COLUMNS`` integers, the
    other contract columns and every ``omega_*`` / ``regime@*`` column floats, never infinite; the bounds of
    ``VALUE_RULES`` (probabilities in [0, 1], entropies in [0, MAX_ENTROPY], ...). Extra columns of
    other names are the producer's and are not checked.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise EntropyLabError(f"{source} lacks trace column(s): {', '.join(missing)}")
    if len(df) == 0:
        raise EntropyLabError(f"{source} holds no records (a traced update has at least one token)")
    for column in INT_COLUMNS:
        check_numeric(df, column, source, kind="integer")
    for column in _float_columns(df.columns):
        check_numeric(df, column, source, kind="float")
    for column, (lo, hi, no_nan) in VALUE_RULES.items():
        values = df[column].to_numpy(dtype=float)
        if no_nan and np.isnan(values).any():
            raise EntropyLabError(f"{source}: column {column!r} holds NaN, which a traced token never has")
        bad = (values < lo - RANGE_SLACK) | (values > hi + RANGE_SLACK)
        if bad.any():
            raise EntropyLabError(
                f"{source}: column {column!r} holds {values[bad][0]!r}, outside [{lo:g}, {hi:g}]; "
                "the file is damaged or was not written by entropy-lab"
            )
    return df


def save_records(df: pd.DataFrame, path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``df`` to Parquet with ``config`` (JSON) in the file metadata, atomically."""
    validate_records(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _to_arrow(df)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(config or {}, default=str).encode()
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)
    return path


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    """``df`` as an Arrow table without its index. A frame of numeric numpy columns (every trace the
    tracer writes) skips pandas' schema metadata, which costs milliseconds per traced step and reads
    back to the same frame; anything else goes through ``Table.from_pandas``."""
    numeric = all(isinstance(t, np.dtype) and t.kind in "biuf" for t in df.dtypes)
    if numeric and df.columns.is_unique and all(isinstance(c, str) for c in df.columns):
        return pa.table({c: df[c].to_numpy() for c in df.columns})
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


def load_records(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a trace file: (records, config), both checked (``validate_records``; the metadata a JSON
    object within ``untrusted``'s depth limit, its ``method`` a string). A bad file gives one error."""
    path = Path(path)
    if not path.is_file():
        raise EntropyLabError(f"no trace file at {path}")
    df, metadata = read_parquet(path, "trace file")
    raw = metadata.get(METADATA_KEY, b"{}")
    try:  # the metadata is data: parsed as JSON, never evaluated
        config = parse_json(raw, "metadata")
    except EntropyLabError as exc:
        raise EntropyLabError(
            f"{path} has unreadable entropy_lab metadata ({exc}); rewrite the file with save_records"
        ) from None
    if not isinstance(config.get("method", ""), str):
        raise EntropyLabError(f"{path} has unreadable entropy_lab metadata (its 'method' is not a string)")
    validate_records(df, source=str(path))
    return df, config
