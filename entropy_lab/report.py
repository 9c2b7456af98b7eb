"""Reports: turn run directories into tables, figures and a markdown summary.

Everything here reads what the trainer wrote (DESIGN.md section 4) - ``config.json``,
``metrics.parquet``, ``eval.parquet``, ``traces/step_*.parquet`` - and hands it to
``entropy_lab.analyses`` (tables) and ``entropy_lab.figures`` (PNG + PDF). No model and
no torch are needed.

- ``run_report``: one run -> ``<run>/figures/*`` and ``<run>/report.md``.
- ``compare_report``: several methods (one run directory per seed) -> a comparison
  table, curves, entropy-change spreads and tightness per method in ``out_dir``.
- ``report_json``: the same tables, machine-readable.

Deliberate simplifications:

- "Start" is the first logged step and "final" the mean of the last 10% of logged steps
  (``analyses.compare``); evaluations use their last row.
- Trace tables use one estimator (``softmax`` by default) for residuals and quadrants;
  the tightness table covers every estimator that has finite values.
- The decomposition starts from ``logit-grad`` and falls back to ``softmax`` (equal for a
  weighted log-probability loss) when the tracer left ``logit-grad`` all NaN.
- Sign agreement uses the default noise floor of ``analyses.tightness``: 1e-3 times the
  largest |delta_entropy| of the run (of the method, in a comparison).
- In a comparison, the traces of all seeds of a method are pooled: the tightness table,
  the token-level |dH| ECDF and the STEER weight histogram are per method, not per seed
  (the per-step |mean dH| points stay one per seed and step).
- Markdown tables are written by a small helper (``markdown_table``), so ``tabulate`` is
  not required.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lab import analyses, figures
from entropy_lab.analyses.compare import ENTROPY, REWARD
from entropy_lab.analyses.tightness import NOISE_FLOOR_FRACTION, available_estimators, estimator_column
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records
from entropy_lab.runs import RunDir, write_text_atomic

REPORT_NAME = "report.md"
FIGURES_DIRNAME = "figures"
DIGITS = 3
"""Significant digits of the numbers in report tables and prose."""
PRECISE_DIGITS = 4
PRECISE_COLUMNS = ("pearson", "spearman", "r2", "sign_agreement", "theory_agreement")
"""Scores whose differences near 1 matter (0.9995 vs 0.99): shown with ``PRECISE_DIGITS``."""

TIGHTNESS_VIEW = [
    "estimator", "n", "pearson", "spearman", "sign_agreement", "n_above_floor", "gain", "r2",
    "rmse_calibrated", "sum_measured", "sum_calibrated",
]  # fmt: skip
SHARE_VIEW = ["factor", "column", "n", "bins", "share"]
QUADRANT_VIEW = [
    "quadrant", "theory", "count", "share", "mean_predicted", "mean_measured", "sign_agreement",
    "theory_agreement",
]  # fmt: skip
DECOMPOSITION_VIEW = ["part", "n", "sum", "sum_abs", "share"]
COMPARE_TIGHTNESS_VIEW = [
    "method", "estimator", "n", "pearson", "sign_agreement", "gain", "r2", "noise_floor",
]  # fmt: skip


# --- loading --------------------------------------------------------------------------------------


def _config_record(run: RunDir) -> dict:
    """``config.json``'s ``config`` entry, or {} when the directory has no readable one."""
    try:
        return dict(run.read_config()["config"])
    except EntropyLabError:
        return {}


def load_run_records(run: RunDir, label: str | None = None) -> pd.DataFrame:
    """All trace records of a run, with ``run`` and ``method`` columns in front.

    Args:
        run: the run directory.
        label: value of the ``run`` column; None = the directory's name.

    Returns:
        The concatenation of every ``traces/step_*.parquet`` (validated by ``load_records``),
        ``method`` taken from ``config.json`` (else the first trace file's metadata, else
        "unknown").

    Raises:
        EntropyLabError: the run has no trace files, or one of them is unreadable or lacks
            columns of the record contract (the message names the file).
    """
    files = run.trace_files()
    if not files:
        raise EntropyLabError(
            f"{run.path} has no trace files (traces/step_*.parquet); train with trace_every > 0"
        )
    frames, metadata = [], {}
    for path in files:
        frame, config = load_records(path)
        frames.append(frame)
        metadata = metadata or config
    records = pd.concat(frames, ignore_index=True)
    method = _config_record(run).get("method") or metadata.get("method") or "unknown"
    records.insert(0, "run", str(label or run.path.name))
    records.insert(0, "method", str(method))
    return records


def _read_tables(run: RunDir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, evals) of a run; empty frames where the files are absent."""
    return run.read_metrics(), run.read_eval()


# --- tables ---------------------------------------------------------------------------------------


def decomposition_base(records: pd.DataFrame) -> str:
    """``logit-grad`` when the records have finite values of it, else ``softmax``."""
    return "logit-grad" if "logit-grad" in available_estimators(records) else "softmax"


def trace_tables(records: pd.DataFrame, estimator: str = "softmax") -> dict[str, pd.DataFrame]:
    """Every analysis table of a set of trace records.

    Args:
        records: trace records of one or more runs (``method``/``run`` columns keep runs apart).
        estimator: the estimator whose residuals and quadrants are tabled.

    Returns:
        ``tightness`` (pooled, one row per estimator and run), ``tightness_by_step``,
        ``residuals`` (per factor bin), ``factor_share`` (eta^2 per factor), ``quadrants``,
        ``decomposition`` (pooled) and ``decomposition_by_step``.
    """
    estimator_column(estimator, records)  # fail early, listing the valid names
    base = decomposition_base(records)
    return {
        "tightness": analyses.tightness_summary(records),
        "tightness_by_step": analyses.tightness(records, by=("step",)),
        "residuals": analyses.residuals_by_factor(records, estimator),
        "factor_share": analyses.factor_variance_share(records, estimator),
        "quadrants": analyses.quadrants(records, estimator),
        "decomposition": analyses.decomposition_summary(records, by=(), base=base),
        "decomposition_by_step": analyses.decomposition_summary(records, by=("step",), base=base),
    }


def _finite_values(series: pd.Series) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return values[np.isfinite(values)]


def weights_vary(records: pd.DataFrame) -> bool:
    """True when ``intervention_weight`` takes more than one finite value (an intervention acted)."""
    if "intervention_weight" not in records.columns:
        return False
    values = _finite_values(records["intervention_weight"])
    return len(values) > 0 and float(np.ptp(values)) > 0.0


# --- figures --------------------------------------------------------------------------------------


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    return figures.save_figure(fig, Path(out_dir) / stem)


def write_trace_figures(
    records: pd.DataFrame, tables: Mapping[str, pd.DataFrame], out_dir: Path
) -> list[Path]:
    """Write the figures of trace records and their ``trace_tables`` as PNG and PDF.

    Stems: ``measured_vs_predicted``, ``residuals_by_factor``, ``quadrants``,
    ``decomposition``, ``tightness_over_steps``, ``entropy_change_distribution`` and, only
    when the intervention weight varies, ``steer_weights``. Returns the written paths.
    """
    out_dir = Path(out_dir)
    written = _save(figures.measured_vs_predicted(records), out_dir, "measured_vs_predicted")
    written += _save(
        figures.residuals_by_factor_panels(tables["residuals"], tables["factor_share"]),
        out_dir,
        "residuals_by_factor",
    )
    written += _save(figures.quadrant_heatmap(tables["quadrants"]), out_dir, "quadrants")
    written += _save(figures.decomposition_bar(tables["decomposition"]), out_dir, "decomposition")
    written += _save(
        figures.tightness_over_steps(tables["tightness_by_step"]), out_dir, "tightness_over_steps"
    )
    written += _save(figures.entropy_change_distribution(records), out_dir, "entropy_change_distribution")
    if weights_vary(records):
        written += _save(figures.steer_weight_distribution(records), out_dir, "steer_weights")
    return written


def write_training_figures(
    metrics: pd.DataFrame, evals: pd.DataFrame, out_dir: Path, stem_prefix: str = ""
) -> list[Path]:
    """Write ``training_curves`` (entropy and reward vs step) and ``pass_at_k`` (when evals have pass@k).

    Frames may hold several runs (``method``/``seed`` columns); empty frames write nothing.
    Returns the written paths (PNG and PDF of each figure).
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    if len(metrics) and "step" in metrics.columns and ({ENTROPY, REWARD} & set(metrics.columns)):
        fig = figures.training_curves(metrics, (ENTROPY, REWARD))
        written += _save(fig, out_dir, f"{stem_prefix}training_curves")
    if len(evals) and "step" in evals.columns and analyses.pass_at_k_columns(evals):
        written += _save(figures.pass_at_k_curves(evals), out_dir, f"{stem_prefix}pass_at_k")
    return written


# --- formatting -----------------------------------------------------------------------------------


def format_number(value: Any, digits: int = DIGITS) -> str:
    """A table cell: ints as is, floats to ``digits`` significant digits, NaN/None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


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


def _figure_links(paths: Sequence[Path], base: Path) -> dict[str, str]:
    """Stem -> markdown image link relative to ``base``, for the PNG files among ``paths``."""
    links = {}
    for path in paths:
        if path.suffix == ".png":
            relative = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
            links[path.stem] = f"![{path.stem.replace('_', ' ')}]({relative})"
    return links


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: numpy types to Python, NaN/inf/NA to None, timestamps to ISO text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """``frame.to_dict("records")`` with every value made JSON-safe (NaN -> None)."""
    return [{str(k): _json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]


def report_json(tables: Mapping[str, pd.DataFrame]) -> dict:
    """The tables as plain JSON-ready data: name -> list of row dicts (records orientation, NaN -> None)."""
    return {name: frame_records(frame) for name, frame in tables.items()}


# --- one run --------------------------------------------------------------------------------------


def _summary(metrics: pd.DataFrame, evals: pd.DataFrame, method: str, seed: int) -> dict:
    """The ``analyses.run_summary`` row of one run as a JSON-safe dict (empty metrics allowed)."""
    if not len(metrics) or "step" not in metrics.columns:
        return {"method": method, "seed": seed, "n_steps": 0}
    labelled = metrics.assign(method=method, seed=seed)
    labelled_evals = (
        evals.assign(method=method, seed=seed) if len(evals) and "step" in evals.columns else None
    )
    table = analyses.run_summary(labelled, labelled_evals)
    return {k: _json_value(v) for k, v in table.iloc[0].items()}


def _noise_floor(tables: Mapping[str, pd.DataFrame]) -> float:
    floors = _finite_values(tables["tightness"]["noise_floor"]) if len(tables.get("tightness", [])) else []
    return float(floors[0]) if len(floors) else float("nan")


def _config_line(config: Mapping[str, Any]) -> str:
    """``method · task · steps · lr · seed`` of a run's config, as one markdown line."""
    data = (
        f"dataset `{config['dataset']}`" if config.get("dataset") else f"task `{config.get('task', 'n/a')}`"
    )
    parts = [
        f"method `{config.get('method', 'n/a')}`",
        data,
        f"{format_number(config.get('steps'))} steps",
        f"lr {format_number(config.get('lr'))}",
        f"seed {format_number(config.get('seed'))}",
    ]
    if config.get("model"):
        parts.append(f"model `{config['model']}`")
    return " · ".join(parts)


def _training_section(summary: Mapping[str, Any], links: Mapping[str, str]) -> list[str]:
    lines = ["## Training", ""]
    if not summary.get("n_steps"):
        return [*lines, "No metrics.parquet in this run.", ""]
    rows = []
    for name, key in (("entropy (nats, batch mean)", "entropy"), ("reward (mean)", "reward")):
        if f"initial_{key}" in summary:
            rows.append(
                {"quantity": name, "start": summary[f"initial_{key}"], "final": summary[f"final_{key}"]}
            )
    lines += [
        f"{summary['n_steps']} logged steps. Start = first step; final = mean of the last 10% of steps.",
        "",
        markdown_table(pd.DataFrame(rows, columns=["quantity", "start", "final"])),
        "",
    ]
    evals = {k: v for k, v in summary.items() if k in ("best_accuracy", "final_accuracy") or "pass@" in k}
    if evals:
        cells = ", ".join(f"{k.replace('_', ' ')} {format_number(v)}" for k, v in evals.items())
        lines += [f"Evaluation (last evaluation unless stated): {cells}.", ""]
    lines += [links[s] for s in ("training_curves", "pass_at_k") if s in links]
    return [*lines, ""]


def _trace_sections(
    records: pd.DataFrame, tables: Mapping[str, pd.DataFrame], links: Mapping[str, str], estimator: str
) -> list[str]:
    steps = sorted(pd.unique(records["step"]))
    span = f"({format_number(steps[0])}-{format_number(steps[-1])})" if steps else ""
    floor = _noise_floor(tables)
    base = next((p for p in tables["decomposition"]["part"] if str(p).startswith("omega_")), "n/a")
    lines = [
        "## Tightness of the first-order estimators",
        "",
        f"{len(records)} traced tokens from {len(steps)} step(s) {span}. Gain g = Σ ΔH ω / Σ ω² (least squares through the origin); r2 is "
        "the R² of ΔH ≈ g ω. Sign agreement counts tokens with |ΔH| above the noise floor of "
        f"{format_number(floor)} nats ({NOISE_FLOOR_FRACTION:g} × the run's largest |ΔH|).",
        "",
        markdown_table(tables["tightness"], TIGHTNESS_VIEW),
        "",
        *[links[s] for s in ("measured_vs_predicted", "tightness_over_steps") if s in links],
        "",
        f"## Residuals by factor ({estimator}, calibrated)",
        "",
        "Share of the residual variance explained by quantile bins of each factor (η²).",
        "",
        markdown_table(tables["factor_share"], SHARE_VIEW),
        "",
        *[links[s] for s in ("residuals_by_factor",) if s in links],
        "",
        "## Quadrants: sign(A) × sign(l_a)",
        "",
        f"First-order theory: ΔH falls for (A>0, l>0) and (A<0, l<0), rises otherwise. Predicted: `{estimator}`, "
        "raw. Agreement columns count tokens above the noise floor.",
        "",
        markdown_table(tables["quadrants"], QUADRANT_VIEW),
        "",
        *[links[s] for s in ("quadrants",) if s in links],
        "",
        "## Decomposition",
        "",
        f"ΔH = ω (`{base}`) + coupling + curvature per token; omission = ω - ω_paper. "
        "Share = Σ|part| / Σ|ΔH| (parts of opposite sign cancel, so shares need not add to 1).",
        "",
        markdown_table(tables["decomposition"], DECOMPOSITION_VIEW),
        "",
        *[links[s] for s in ("decomposition", "entropy_change_distribution", "steer_weights") if s in links],
        "",
    ]
    return lines


def run_markdown(
    name: str,
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    records: pd.DataFrame | None,
    tables: Mapping[str, pd.DataFrame],
    links: Mapping[str, str],
    estimator: str = "softmax",
) -> str:
    """The text of one run's ``report.md`` (see ``run_report``)."""
    lines = [f"# entropy-lab report: {name}", "", _config_line(config), ""]
    lines += _training_section(summary, links)
    if records is None:
        lines += [
            "## Traces",
            "",
            "No trace files in traces/: tightness, residual, quadrant and decomposition tables need a run "
            "trained with trace_every > 0.",
            "",
        ]
    else:
        lines += _trace_sections(records, tables, links, estimator)
    return "\n".join(lines).rstrip() + "\n"


def run_report(run: RunDir, estimator: str = "softmax") -> dict:
    """Tables, figures and ``report.md`` of one run directory.

    Loads the traces (when there are any), metrics and evaluations; writes the figures into
    ``run.figures_dir`` and the markdown into ``run.report_path``. A run without traces
    gets a metrics-only report.

    Returns:
        ``{"tables": {name: DataFrame} (empty without traces), "figures": [paths],
        "report": path of report.md, "summary": dict}`` - the summary holds ``run``, the
        ``analyses.run_summary`` statistics (NaN -> None), ``trace_tokens``, ``trace_steps``
        and ``noise_floor`` (None without traces).
    """
    config = run.read_config()["config"]
    metrics, evals = _read_tables(run)
    records = load_run_records(run) if run.trace_files() else None
    tables = trace_tables(records, estimator) if records is not None else {}
    written = write_training_figures(metrics, evals, run.figures_dir)
    if records is not None:
        written += write_trace_figures(records, tables, run.figures_dir)
    summary = {
        "run": run.path.name,
        **_summary(metrics, evals, str(config.get("method", "unknown")), int(config.get("seed", 0) or 0)),
        "trace_tokens": 0 if records is None else len(records),
        "trace_steps": 0 if records is None else int(records["step"].nunique()),
        "noise_floor": None if records is None else _json_value(_noise_floor(tables)),
    }
    links = _figure_links(written, run.path)
    text = run_markdown(run.path.name, config, summary, records, tables, links, estimator)
    write_text_atomic(text, run.report_path)
    return {"tables": tables, "figures": written, "report": run.report_path, "summary": summary}


# --- several runs ---------------------------------------------------------------------------------


def _seeds(runs: Sequence[RunDir]) -> list[int]:
    """Each run's config seed; 0, 1, 2, ... instead when seeds repeat (they label seeds, so must differ)."""
    seeds = [int(_config_record(run).get("seed", i) or 0) for i, run in enumerate(runs)]
    return seeds if len(set(seeds)) == len(seeds) else list(range(len(runs)))


def _collect(
    runs: Mapping[str, Sequence[RunDir]],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    """Concatenated (metrics, evals, trace records) with ``method``/``seed`` columns, and a run listing."""
    metrics, evals, records, listing = [], [], [], []
    for method, dirs in runs.items():
        for run, seed in zip(dirs, _seeds(dirs), strict=True):
            run_metrics, run_evals = _read_tables(run)
            if len(run_metrics):
                metrics.append(run_metrics.assign(method=method, seed=seed))
            if len(run_evals):
                evals.append(run_evals.assign(method=method, seed=seed))
            has_traces = bool(run.trace_files())
            if has_traces:
                frame = load_run_records(run, label=f"{method}/seed{seed}")
                records.append(frame.assign(method=method, seed=seed))
            listing.append(
                {
                    "method": method,
                    "seed": seed,
                    "run": str(run.path),
                    "steps": len(run_metrics),
                    "traces": has_traces,
                }
            )
    return _concat(metrics), _concat(evals), _concat(records), listing


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _steps_per_seed(records: pd.DataFrame, seeds: pd.Series) -> pd.DataFrame:
    """A copy whose ``step`` is unique per (seed, step), so per-step means are never averaged over seeds.

    ``figures.entropy_change_distribution`` averages ΔH per (method, step); with the seeds of a
    method pooled, one step of two seeds would otherwise become one damped point.
    """
    codes = pd.factorize(pd.MultiIndex.from_arrays([seeds.to_numpy(), records["step"].to_numpy()]))[0]
    return records.assign(step=codes)


def _with_ci(table: pd.DataFrame) -> pd.DataFrame:
    """The ``compare_runs`` table with each ``<stat>``/``<stat>_ci`` pair merged into "mean ± half-width"."""
    out = table[["method", "n_seeds"]].copy()
    for column in table.columns:
        if column in ("method", "n_seeds") or column.endswith("_ci"):
            continue
        ci = table.get(f"{column}_ci", pd.Series(np.nan, index=table.index))
        out[column] = [
            format_number(m) + (f" ± {format_number(h, 2)}" if h is not None and np.isfinite(h) else "")
            for m, h in zip(table[column], ci, strict=True)
        ]
    return out


def compare_markdown(
    runs_listing: list[dict],
    table: pd.DataFrame,
    tightness: pd.DataFrame,
    links: Mapping[str, str],
) -> str:
    """The text of a comparison's ``report.md`` (see ``compare_report``)."""
    methods = list(dict.fromkeys(row["method"] for row in runs_listing))
    lines = [f"# entropy-lab comparison: {' vs '.join(methods)}", "", "## Runs", ""]
    lines += [markdown_table(pd.DataFrame(runs_listing)), "", "## Summary across seeds", ""]
    if len(table):
        lines += [
            "Mean across seeds ± half-width of the 95% t-interval (none for one seed). Start = first step; "
            "final = mean of the last 10% of steps; evaluations: last evaluation.",
            "",
            markdown_table(_with_ci(table)),
            "",
        ]
    else:
        lines += ["No metrics.parquet in these runs.", ""]
    lines += [links[s] for s in ("training_curves", "pass_at_k") if s in links]
    lines += ["", "## Entropy change per token and per step", ""]
    spread = [links[s] for s in ("entropy_change_distribution", "steer_weights") if s in links]
    lines += spread or ["No trace files in these runs."]
    lines += ["", "## Tightness per method (traces of all seeds pooled)", ""]
    if len(tightness):
        lines += [
            f"Sign agreement counts tokens with |ΔH| above the noise floor ({NOISE_FLOOR_FRACTION:g} × the "
            "method's largest |ΔH|, column noise_floor, nats).",
            "",
            markdown_table(tightness, COMPARE_TIGHTNESS_VIEW),
        ]
    else:
        lines += ["No trace files in these runs."]
    return "\n".join(lines).rstrip() + "\n"


def compare_report(runs: Mapping[str, Sequence[RunDir]], out_dir: Path) -> dict:
    """Compare methods (one run directory per seed): table, curves, |ΔH| spread, tightness.

    Args:
        runs: method label -> its run directories, one per seed. The label replaces the
            config's method name, so two variants of one method can be compared.
        out_dir: where ``report.md`` and ``figures/*.png|pdf`` go.

    Returns:
        ``{"table": analyses.compare_runs table (empty without metrics), "tightness":
        pooled tightness per method and estimator (empty without traces), "figures": [paths],
        "report": path of report.md}``.
    """
    if not runs or not any(runs.values()):
        raise EntropyLabError("compare_report needs at least one run directory")
    out_dir = Path(out_dir)
    figures_dir = out_dir / FIGURES_DIRNAME
    metrics, evals, records, listing = _collect(runs)
    table = analyses.compare_runs(metrics, evals if len(evals) else None) if len(metrics) else pd.DataFrame()
    written = write_training_figures(metrics, evals, figures_dir)
    tightness = pd.DataFrame()
    if len(records):
        per_method = records.drop(columns=["run", "seed"])  # pool seeds: one series per method
        tightness = analyses.tightness_summary(per_method)
        spread = figures.entropy_change_distribution(_steps_per_seed(per_method, records["seed"]))
        written += _save(spread, figures_dir, "entropy_change_distribution")
        if weights_vary(per_method):
            written += _save(figures.steer_weight_distribution(per_method), figures_dir, "steer_weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / REPORT_NAME
    write_text_atomic(compare_markdown(listing, table, tightness, _figure_links(written, out_dir)), report)
    return {"table": table, "tightness": tightness, "figures": written, "report": report}
