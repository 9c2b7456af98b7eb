"""Reading files that came from a run directory, a checkpoint or a model folder: untrusted data.

A run directory may have been copied, shared, hand-edited or damaged by a full disk, so
nothing read from one is used before it is checked. This module holds the checks every
reader shares; each failure is one ``EntropyLabError`` line naming the file and what is
wrong with it:

- ``read_json`` / ``parse_json``: JSON within a size and a nesting-depth limit, parsed as
  data only (never evaluated), its top level of the expected type.
- ``read_parquet``: a Parquet file into a DataFrame, every failure of pyarrow (truncated
  file, flipped bytes, an unknown encoding) one line; the pandas metadata in the file is
  ignored (it only restores an index, which entropy-lab never writes).
- ``check_step_table``: ``metrics.parquet`` and ``eval.parquet``: an integer ``step``
  column, unique and ascending, and numbers only (integers or floats, never infinite).

Simplification: the limits are fixed per kind of file, far above what entropy-lab writes,
not configurable.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from entropy_lab.errors import EntropyLabError

MAX_JSON_BYTES = 16 << 20
"""Largest JSON file read by default (16 MiB): a run's config.json is a few KiB."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of lists and objects read by default (config.json has depth 3, a verl config 6)."""


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts (a scalar: 0), iteratively: a deep value cannot exhaust the stack."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in children)
    return deepest


def parse_json(
    text: str | bytes,
    source: str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type = dict,
) -> Any:
    """``text`` parsed as JSON data; one error naming ``source`` if it is not JSON, too deep or not ``expect``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise EntropyLabError(
            f"{source} is nested too deeply to be read (more than {max_depth} levels)"
        ) from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EntropyLabError(f"{source} is not valid JSON ({str(exc).splitlines()[0][:100]})") from None
    if _depth(value) > max_depth:
        raise EntropyLabError(f"{source} is nested too deeply to be read (more than {max_depth} levels)")
    if not isinstance(value, expect):
        want = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise EntropyLabError(f"{source} is not {want} (its top level is a {type(value).__name__})")
    return value


def read_json(
    path: str | os.PathLike,
    *,
    what: str = "file",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type = dict,
) -> Any:
    """The JSON in ``path`` (a regular file of at most ``max_bytes``); see ``parse_json``."""
    path = Path(path)
    if not path.is_file():
        raise EntropyLabError(f"{what} {path} is missing or not a regular file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise EntropyLabError(
                f"{what} {path} is {size} bytes, more than the {max_bytes} such a file can be; it is not one entropy-lab wrote"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise EntropyLabError(f"could not read {what} {path}: {exc.strerror or exc}") from None
    return parse_json(raw, f"{what} {path}", max_depth=max_depth, expect=expect)


def read_parquet(path: str | os.PathLike, what: str = "table") -> tuple[pd.DataFrame, dict[bytes, bytes]]:
    """(frame, schema metadata) of the Parquet file ``path``; one error line if pyarrow cannot read it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
        frame = table.to_pandas(ignore_metadata=True)
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError, MemoryError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise EntropyLabError(f"{path} is not a readable Parquet {what} ({why})") from None
    return frame, dict(table.schema.metadata or {})


def _bad_column(df: pd.DataFrame, column: str, source: str, why: str) -> EntropyLabError:
    return EntropyLabError(
        f"{source}: column {column!r} {why}; the file is damaged or was not written by entropy-lab"
    )


def check_numeric(df: pd.DataFrame, column: str, source: str, *, kind: str = "number") -> None:
    """``df[column]`` holds ``kind`` values: "integer", "float" or "number" (either), never booleans or
    infinities."""
    s, types = df[column], pd.api.types
    ok = {
        "integer": types.is_integer_dtype,
        "float": types.is_float_dtype,
        "number": lambda d: types.is_integer_dtype(d) or types.is_float_dtype(d),
    }[kind](s.dtype) and not types.is_bool_dtype(s.dtype)
    if not ok:
        plural = {"integer": "integers", "float": "floats", "number": "numbers"}[kind]
        raise _bad_column(df, column, source, f"holds {s.dtype} values, not {plural}")
    if types.is_float_dtype(s.dtype) and bool(s.abs().eq(math.inf).any()):
        raise _bad_column(df, column, source, "holds an infinite value")


def check_step_table(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """A per-step table (metrics, evaluations): integer ``step`` >= 0, unique and ascending; numbers only."""
    if df.empty and len(df.columns) == 0:
        return df
    if "step" not in df.columns:
        raise EntropyLabError(
            f"{source} has no 'step' column; the file is damaged or was not written by entropy-lab"
        )
    check_numeric(df, "step", source, kind="integer")
    steps = df["step"]
    if bool((steps < 0).any()) or not steps.is_monotonic_increasing or not steps.is_unique:
        raise _bad_column(df, "step", source, "is not a unique, ascending sequence of steps >= 0")
    for column in df.columns:
        if column != "step":
            check_numeric(df, str(column), source)
    return df


SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""Bytes per element of the safetensors dtypes whose size is checked (others: offsets only)."""
MAX_SAFETENSORS_HEADER = 100_000_000
"""The safetensors format's own limit on the JSON header, in bytes."""


def _naturals(xs: object, length: int | None = None) -> bool:
    """``xs`` is a list (of ``length`` items) of non-negative integers."""
    return (
        isinstance(xs, list)
        and (length is None or len(xs) == length)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    )


def check_safetensors(path: str | os.PathLike) -> None:
    """The header of safetensors file ``path`` is sane, before any loader maps the file.

    Checked: the 8-byte header length fits the file and the format's limit; the header is a JSON
    object within the depth limit; each tensor has a string dtype, a shape of non-negative
    integers and data offsets inside the file, consistent with dtype x shape where the dtype's
    size is known.
    """
    path = Path(path)

    def bad(why: str) -> EntropyLabError:
        return EntropyLabError(f"weights file {path} is damaged: {why}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise bad(f"its header length {n} does not fit a file of {size} bytes")
            header = parse_json(fh.read(n), f"the header of weights file {path}", max_depth=3)
    except OSError as exc:
        raise EntropyLabError(f"could not read weights file {path}: {exc.strerror or exc}") from None
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("its __metadata__ is not a mapping of strings")
            continue
        if not isinstance(entry, dict):
            raise bad(f"the entry of tensor {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not _naturals(shape) or not _naturals(offsets, 2):
            raise bad(f"tensor {name!r} has no valid dtype, shape and data_offsets")
        assert isinstance(shape, list) and isinstance(offsets, list)  # _naturals checked them
        begin, end = offsets
        if not begin <= end <= data:
            raise bad(f"tensor {name!r} lies outside the file (bytes {begin}..{end} of {data})")
        if dtype in SAFETENSORS_ITEMSIZE and math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype] != end - begin:
            raise bad(
                f"tensor {name!r} of shape {shape} and dtype {dtype} does not fill bytes {begin}..{end}"
            )
