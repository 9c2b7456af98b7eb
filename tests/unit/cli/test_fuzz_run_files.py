"""Random corruptions of every kind of run file, each through the command that reads it.

For each kind (config.json, a trace file, metrics.parquet, eval.parquet, a checkpoint manifest)
200 corruptions, and 50 more of config.json read by ``train --resume``, drawn from seeded
generators: truncation, flipped, inserted and deleted bytes, wrong JSON types, deep nesting,
huge and non-finite values, missing and unknown keys; for Parquet files also columns of the
wrong dtype, out-of-range and non-finite values, dropped columns and damaged metadata. Each
case runs in-process through the CLI (``figures --run``, ``trace --run`` on the checkpoint,
``train --resume``) and must end with exit code 2 and exactly one line on
stderr, ``error: ...``, and leave every file outside the run directory unchanged.

A corruption can leave a valid file (a flipped digit inside a float, whitespace in JSON). Exit
code 0 is then accepted only when this module's own check of the corrupted file (``*_valid``
below, written from the contract in docs/tracing.md, not calling the loaders under test except
``TrainConfig.from_dict`` for the ranges of the configuration) says the content is valid.

Figures are not drawn (the two figure writers are replaced by stubs): rendering takes seconds
per run and reads only tables that were already loaded and checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_input_cases import BASE
from conftest import digit_reward
from tiny_training import train_cli_run
from typer.testing import CliRunner

from entropy_lab.cli.app import app
from entropy_lab.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = 200
"""Corruptions per kind of file."""
RESUME_CASES = 50
"""config.json through ``train --resume`` besides its 200 through ``figures``: an accepted case loads the policy."""
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model directory, a finished 2-step run with traces and a checkpoint), trained once."""
    return train_cli_run(tmp_path_factory.mktemp("fuzz"), BASE)


@pytest.fixture
def no_figures(monkeypatch):
    import entropy_lab.report.compose as compose

    monkeypatch.setattr(compose, "write_training_figures", lambda *a, **k: [])
    monkeypatch.setattr(compose, "write_trace_figures", lambda *a, **k: [])


# --- corruptions ---------------------------------------------------------------------------------


def byte_corruption(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["truncate", "flip", "flip", "insert", "delete", "append", "empty", "random"])
    n = len(data)
    if kind == "truncate":
        cut = rng.randrange(n)
        return data[:cut], f"truncated to {cut} bytes"
    if kind == "flip":
        out = bytearray(data)
        where = [rng.randrange(n) for _ in range(rng.randint(1, 4))]
        for i in where:
            out[i] ^= rng.randint(1, 255)
        return bytes(out), f"bytes {where} flipped"
    if kind == "insert":
        i = rng.randrange(n)
        return data[:i] + rng.randbytes(rng.randint(1, 16)) + data[i:], f"bytes inserted at {i}"
    if kind == "delete":
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 16) :], f"bytes deleted at {i}"
    if kind == "append":
        return data + rng.randbytes(rng.randint(1, 64)), "junk appended"
    if kind == "empty":
        return b"", "emptied"
    return rng.randbytes(rng.randint(1, 2 * n)), "replaced by random bytes"


WRONG_VALUES = [
    "text", "", [], [1, 2], {}, {"a": 1}, None, True, False, -1, 0, 10**30, -(10**30), 1e308, -1e308,
    2**63, 2**64, 0.5, -0.5,
]  # fmt: skip


def wrong_value(rng: random.Random):
    roll = rng.random()
    if roll < 0.1:
        return deep(rng)
    if roll < 0.15:
        return "x" * rng.choice([10**3, 10**6])
    return rng.choice(WRONG_VALUES)


def short(value) -> str:
    return type(value).__name__ if isinstance(value, (list, dict)) else repr(value)[:40]


def deep(rng: random.Random):
    value: object = 1
    for _ in range(rng.choice([33, 100, 2000])):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def paths_in(value, prefix=()):
    """Every (path of keys) to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, (*prefix, i))


def set_at(value, path, new):
    if not path:
        return new
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = new
    return value


def json_corruption(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    record = json.loads(data)
    kind = rng.choice(["bytes", "bytes", "value", "value", "value", "drop", "add", "top", "nan", "deep"])
    if kind == "bytes":
        return byte_corruption(data, rng)
    paths = [p for p in paths_in(record) if p]
    path = rng.choice(paths)
    if kind == "value":
        new = wrong_value(rng)
        set_at(record, path, new)
        what = f"{path} = {short(new)}"
    elif kind == "drop":
        parent = record
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        what = f"{path} removed"
    elif kind == "add":
        parent = rng.choice([p for p in paths_in(record) if isinstance(_get(record, p), dict)])
        _get(record, parent)["unknown_key"] = wrong_value(rng)
        what = f"unknown key added at {parent}"
    elif kind == "top":
        record = rng.choice([[record], "text", 3, None])
        what = f"top level replaced by {type(record).__name__}"
    elif kind == "nan":
        new = rng.choice([math.nan, math.inf, -math.inf])
        set_at(record, path, new)
        what = f"{path} = {new}"
    else:
        record = set_at(record, path, deep(rng))
        what = f"{path} nested deeply"
    try:
        text = json.dumps(record)
    except RecursionError:  # json.dumps cannot write it either: write the nesting by hand
        text = "[" * 5000 + "]" * 5000
    return text.encode(), what


def _get(value, path):
    for k in path:
        value = value[k]
    return value


def parquet_corruption(data: bytes, rng: random.Random, path: Path) -> tuple[bytes, str]:
    kind = rng.choice(["bytes", "bytes", "bytes", "column", "column", "column", "metadata", "rows"])
    if kind == "bytes":
        return byte_corruption(data, rng)
    table = pq.read_table(path)
    df = table.to_pandas()
    meta = dict(table.schema.metadata or {})
    if kind == "metadata":
        key = rng.choice(sorted(meta))
        raw, what = (
            json_corruption(meta[key], rng) if key == b"entropy_lab" else byte_corruption(meta[key], rng)
        )
        meta[key] = raw
        what = f"metadata {key!r}: {what}"
    elif kind == "rows":
        df = df.iloc[:0] if rng.random() < 0.3 else df.assign(step=df["step"] + rng.choice([1, -1, 10**6]))
        what = "rows emptied or steps shifted"
    else:
        col = rng.choice(list(df.columns))
        choice = rng.choice(["str", "bool", "huge", "nan", "inf", "drop", "int", "negative"])
        n = len(df)
        if choice == "str":
            df[col] = df[col].astype(str)
            if n:
                df.loc[df.index[:: rng.randint(1, 3)], col] = "x"
        elif choice == "bool":
            df[col] = df[col].astype(bool)
        elif choice == "huge":
            df[col] = df[col].astype(float)
            df.loc[df.index[rng.randrange(n)] if n else [], col] = rng.choice([1e300, -1e300, 2.0**62])
        elif choice == "nan":
            df[col] = df[col].astype(float)
            df.loc[df.index[rng.randrange(n)] if n else [], col] = math.nan
        elif choice == "inf":
            df[col] = df[col].astype(float)
            df.loc[df.index[rng.randrange(n)] if n else [], col] = rng.choice([math.inf, -math.inf])
        elif choice == "negative":
            df[col] = -df[col]
        elif choice == "int":
            df[col] = df[col].astype("float64").round().astype("int64") if df[col].notna().all() else df[col]
        else:
            df = df.drop(columns=[col])
        what = f"column {col!r}: {choice}"
    out = pa.Table.from_pandas(df, preserve_index=False)
    out = out.replace_schema_metadata({**(out.schema.metadata or {}), **meta})
    sink = pa.BufferOutputStream()
    pq.write_table(out, sink)
    return sink.getvalue().to_pybytes(), what


# --- the tests' own checks of a corrupted file that a command accepted -----------------------------


def config_valid(path: Path, original: bytes) -> bool:
    """config.json: a JSON object whose ``config`` has some of the original's keys (a missing one takes
    its default), each of its original JSON type, and values in range."""
    try:
        record, base = json.loads(path.read_bytes()), json.loads(original)
        config = record["config"]
        same = set(config) <= set(base["config"]) and all(
            type(v) is type(base["config"][k])
            or {type(v), type(base["config"][k])} in ({int, float}, {str, type(None)})
            for k, v in config.items()
        )
        TrainConfig.from_dict(config)
        return (
            same and isinstance(record.get("seed", 0), int) and isinstance(record.get("versions", {}), dict)
        )
    except Exception:
        return False


MAX_H = math.log(2.0**32) + 1e-3
BOUNDS = {
    "prob": (-1e-3, 1 + 1e-3), "logprob": (-math.inf, 1e-3), "surprisal": (-1e-3, math.inf),
    "entropy_before": (-1e-3, MAX_H), "entropy_after": (-1e-3, MAX_H), "delta_entropy": (-MAX_H, MAX_H),
    "collision": (-math.inf, math.inf),
}  # fmt: skip
INTS = ["step", "update", "sample", "position", "token_id"]


def table_of(path: Path) -> tuple[pd.DataFrame, pa.Schema] | None:
    try:
        table = pq.read_table(path)
        return table.to_pandas(ignore_metadata=True), table.schema
    except Exception:
        return None


def trace_valid(path: Path, original: bytes) -> bool:
    """A trace file: the original's contract columns, int64 where the original has int64 and float64
    for the other contract and omega_* columns; JSON metadata; rows, all of step 1; values in bounds."""
    got = table_of(path)
    if got is None:
        return False
    df, schema = got
    base = pq.read_schema(pa.BufferReader(original))
    try:
        meta = json.loads((schema.metadata or {}).get(b"entropy_lab", b"{}"))
        assert isinstance(meta, dict) and isinstance(meta.get("method", ""), str)
    except Exception:
        return False
    contract = [n for n in base.names if n != "omega_paper_appendix"]
    floats = [n for n in df.columns if (n in contract and n not in INTS) or n.startswith("omega_")]
    if not set(contract) <= set(df.columns) or len(df) == 0:
        return False
    if any(df[c].dtype != np.int64 for c in INTS) or any(df[c].dtype != np.float64 for c in floats):
        return False
    if (df[INTS] < 0).any().any() or not (df["step"] == 1).all() or np.isinf(df[floats].to_numpy()).any():
        return False
    return all(df[c].notna().all() and df[c].between(lo, hi).all() for c, (lo, hi) in BOUNDS.items())


def steps_table_valid(path: Path, original: bytes) -> bool:
    """metrics/eval: an int64 ``step`` >= 0, unique and ascending; every other column int64 or float64, no inf."""
    got = table_of(path)
    if got is None:
        return False
    df, _ = got
    if "step" not in df.columns or df["step"].dtype != np.int64:
        return False
    if any(df[c].dtype not in (np.int64, np.float64) for c in df.columns):
        return False
    steps = df["step"]
    return bool(
        (steps >= 0).all()
        and steps.is_monotonic_increasing
        and steps.is_unique
        and not np.isinf(df.to_numpy(dtype=float)).any()
    )


def manifest_valid(path: Path, original: bytes) -> bool:
    """A manifest is accepted only when it still says exactly what the original said."""
    try:
        return json.loads(path.read_bytes()) == json.loads(original)
    except Exception:
        return False


# --- the kinds ---------------------------------------------------------------------------------------

KINDS = {
    # kind: (file in the run, command, corruption, check of an accepted file, what the run copy keeps);
    # a copy without traces makes a report skip the trace tables, which only the trace kind needs
    "config.json": ("config.json", "figures --run {run}", "json", config_valid, "tables"),
    "trace": ("traces/step_000001.parquet", "figures --run {run}", "parquet", trace_valid, "traces"),
    "metrics": ("metrics.parquet", "figures --run {run}", "parquet", steps_table_valid, "tables"),
    "eval": ("eval.parquet", "figures --run {run}", "parquet", steps_table_valid, "tables"),
    "manifest": (
        "checkpoints/step_000002/checkpoint.json",
        "trace --run {run}/checkpoints/step_000002",
        "json",
        manifest_valid,
        "all",
    ),
    "resume-config": (
        "config.json",
        "train {base} --steps 2 --out {run} --resume",
        "json",
        config_valid,
        "all",
    ),
}
LEFT_OUT = {"tables": ("traces", "checkpoints"), "traces": ("checkpoints",), "all": ()}
"""What a run copy leaves out, by what it keeps."""


def tree_hash(root: Path, skip: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if not p.is_relative_to(skip)
    }


@pytest.mark.parametrize("kind", list(KINDS))
def test_corrupted_run_files_end_in_one_error_line(kind, trained, tmp_path, no_figures, monkeypatch):
    from entropy_lab.tasks.arithmetic import ArithmeticTask

    monkeypatch.setattr(ArithmeticTask, "reward", digit_reward)
    import typer.testing

    command_object = typer.main.get_command(app)  # built once, not once per case
    monkeypatch.setattr(typer.testing, "_get_command", lambda _: command_object)
    model, source = trained
    rel, command, corruption, valid, keeps = KINDS[kind]
    if LEFT_OUT[keeps]:
        shutil.copytree(source, tmp_path / "source", ignore=shutil.ignore_patterns(*LEFT_OUT[keeps]))
        source = tmp_path / "source"
    original = (source / rel).read_bytes()
    run = tmp_path / "run"
    failures, outcomes = [], Counter()
    cases = RESUME_CASES if kind == "resume-config" else CASES
    for case in range(cases):
        rng = random.Random(f"{kind}-{case}")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(source, run)
        target = run / rel
        if corruption == "json":
            data, what = json_corruption(original, rng)
        else:
            data, what = parquet_corruption(original, rng, target)
        target.write_bytes(data)
        before = tree_hash(tmp_path, run) | tree_hash(model, run)  # the source copy is outside the run too
        argv = shlex.split(command.format(run=run, base=BASE.format(model=model)))
        result = runner.invoke(app, argv)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if result.exit_code == 2:
            ok = len(lines) == 1 and lines[0].startswith("error:")
            outcomes["error"] += 1
        else:
            ok = result.exit_code == 0 and valid(target, original) if target.exists() else False
            outcomes["accepted" if ok else f"exit {result.exit_code}"] += 1
        if tree_hash(tmp_path, run) | tree_hash(model, run) != before:
            ok = False
            what += " (changed files outside the run)"
        if not ok:
            failures.append(
                f"case {case} ({what}): exit {result.exit_code}, {lines[-3:]}, {result.exception!r}"
            )
    assert not failures, f"{len(failures)} of {cases} failed ({dict(outcomes)}):\n" + "\n".join(failures[:8])
    assert outcomes["error"] >= cases // 2, dict(outcomes)  # the corruptions mostly produce bad files
