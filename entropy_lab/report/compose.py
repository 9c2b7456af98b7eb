"""Reports: turn run directories into tables, figures and a markdown summary.

Everything here reads what the trainer wrote (docs/cli.md, Run directories) - ``config.json``,
``metrics.parquet``, ``eval.parquet``, ``traces/step_*.parquet`` - and hands it to
``entropy_lab.analyses`` (tables) and ``entropy_lab.figures`` (PNG + PDF). No model and
no torch are needed. This module composes the two documents; the pieces have their own
modules: ``load`` (reading runs), ``entries`` (the registered analyses: table, figure
and section each), ``markdown`` and ``json_tables`` (output formats), and
``entropy_lab.formatting`` (numbers).

- ``run_report``: one run -> ``<run>/figures/*``, ``<run>/report.md``, ``<run>/report.json`` and
  ``<run>/report.html`` (self-contained: tables, figures and every traced token, ``report.html``).
- ``compare_report``: several methods (one run directory per seed) -> a comparison
  table, curves, entropy-change spreads and tightness per method in ``out_dir``, as
  ``report.md`` and ``report.json``.
- ``report_json``: the same tables, machine-readable. ``report.json`` holds them next to
  ``report.md`` with the run's name, its scope and the key facts of its configuration
  (``scripts/results.py`` builds docs/results.md from these files).

Deliberate simplifications:

- "Start" is the first logged step and "final" the mean of the last 10% of logged steps
  (``analyses.compare``); evaluations use their last row.
- In a comparison, the traces of all seeds of a method are pooled: the tightness table,
  the token-level |dH| ECDF and the STEER weight histogram are per method, not per seed
  (the per-step |mean dH| points stay one per seed and step).
- The trace tables' own simplifications are listed in ``entropy_lab.report.entries``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import entropy_lab.analyses as analyses
import entropy_lab.figures as figures
from entropy_lab.analyses.compare import ENTROPY, REWARD
from entropy_lab.analyses.tightness import NOISE_FLOOR_FRACTION
from entropy_lab.errors import EntropyLabError
from entropy_lab.formatting import format_number
from entropy_lab.report.entries import (
    SectionContext,
    figure_stems,
    noise_floor,
    trace_sections,
    trace_tables,
    weights_vary,
    write_trace_figures,
)
from entropy_lab.report.html import HTML_NAME, write_html_report
from entropy_lab.report.json_tables import json_value, report_json
from entropy_lab.report.load import collect, config_record, load_run_records, read_tables
from entropy_lab.report.markdown import figure_links, markdown_table
from entropy_lab.report.tokens import TokenText, find_tokenizer
from entropy_lab.run_files import FIGURE_SUFFIXES, check_real_dir, check_replaceable, record_written
from entropy_lab.runs import RunDir, write_text_atomic

__all__ = [
    "compare_report",
    "format_number",
    "load_run_records",
    "markdown_table",
    "report_json",
    "run_report",
    "trace_tables",
]

REPORT_NAME = "report.md"
REPORT_JSON_NAME = "report.json"
KEY_FACTS = (
    "method", "task", "dataset", "model", "seed", "steps", "prompts_per_step", "samples_per_prompt",
    "optimizer", "lr", "trace_every", "trace_jvp", "controller", "entropy_target", "eval_prompts", "eval_k",
)  # fmt: skip
"""Configuration fields that ``report.json`` carries: what a reader needs to know which run it was."""
FIGURES_DIRNAME = "figures"
COMPARE_TIGHTNESS_VIEW = [
    "method", "estimator", "n", "pearson", "sign_agreement", "gain", "r2", "noise_floor",
]  # fmt: skip


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    return figures.save_figure(fig, Path(out_dir) / stem)


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


def key_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``KEY_FACTS`` entries of a run's configuration, JSON-safe (absent fields are left out)."""
    return {key: json_value(config[key]) for key in KEY_FACTS if key in config}


def write_report_json(
    path: Path, name: str, scope: str, config: Mapping[str, Any], tables: Mapping[str, pd.DataFrame], **extra
) -> Path:
    """Write ``{"run", "scope", "config", **extra, "tables"}`` to ``path`` atomically; returns ``path``.

    Args:
        path: the file (``report.json`` next to ``report.md``).
        name: the run's (or the comparison's) directory name.
        scope: ``"run"`` or ``"compare"``.
        config: the key facts (``key_facts``), or method -> key facts for a comparison.
        tables: name -> table, written through ``report_json`` (records orientation, NaN -> None).
        extra: further JSON-safe entries (the run summary).
    """
    payload = {"run": name, "scope": scope, "config": dict(config), **extra, "tables": report_json(tables)}
    write_text_atomic(json.dumps(payload, indent=2, allow_nan=False) + "\n", path)
    record_written([path])
    return path


def write_report_text(text: str, path: Path) -> Path:
    """``report.md``, atomically, recorded as entropy-lab's (``entropy_lab.run_files``)."""
    write_text_atomic(text, path)
    record_written([path])
    return path


def check_outputs(out_dir: Path) -> None:
    """Before anything is drawn: every file a report may write in ``out_dir`` is absent or entropy-lab's.

    One line names every file in the way (a user's ``report.md``, a poster named like a figure);
    nothing is written then. ``figures/`` must be a real folder inside ``out_dir``.
    """
    figures_dir = out_dir / FIGURES_DIRNAME
    check_real_dir(out_dir, out_dir)
    check_real_dir(figures_dir, out_dir)
    stems = ["training_curves", "pass_at_k", *figure_stems()]
    check_replaceable(
        [out_dir / REPORT_NAME, out_dir / REPORT_JSON_NAME, out_dir / HTML_NAME]
        + [figures_dir / f"{stem}{suffix}" for stem in dict.fromkeys(stems) for suffix in FIGURE_SUFFIXES],
        what="choose another output directory",
    )


# --- one run ----------------------------------------------------------------------------------


def _summary(metrics: pd.DataFrame, evals: pd.DataFrame, method: str, seed: int) -> dict:
    """The ``analyses.run_summary`` row of one run as a JSON-safe dict (empty metrics allowed)."""
    if not len(metrics) or "step" not in metrics.columns:
        return {"method": method, "seed": seed, "n_steps": 0}
    labelled = metrics.assign(method=method, seed=seed)
    labelled_evals = (
        evals.assign(method=method, seed=seed) if len(evals) and "step" in evals.columns else None
    )
    table = analyses.run_summary(labelled, labelled_evals)
    return {k: json_value(v) for k, v in table.iloc[0].items()}


def _named(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """``frame`` with its ``method`` column set to ``label`` (empty frames stay as they are)."""
    return frame.assign(method=label) if len(frame) else frame


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
    if records is not None:
        lines += [f"Every traced token, coloured by its entropy change: [{HTML_NAME}]({HTML_NAME}).", ""]
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
        lines += trace_sections(SectionContext(records, tables, links, estimator))
    return "\n".join(lines).rstrip() + "\n"


def run_report(run: RunDir, estimator: str = "softmax") -> dict:
    """Tables, figures, ``report.md`` and ``report.json`` of one run directory.

    Loads the traces (when there are any), metrics and evaluations; writes the figures into
    ``run.figures_dir``, the markdown into ``run.report_path`` and, next to it, the same
    tables as ``report.json`` (``write_report_json``, scope ``"run"``, with the summary) and
    the page ``report.html`` (``report.html``: tables, figures, every traced token with its
    text decoded by the run's own tokenizer when it holds one). A run without traces gets a
    metrics-only report.

    Returns:
        ``{"tables": {name: DataFrame} (empty without traces), "figures": [paths],
        "report": path of report.md, "json": path of report.json, "html": path of report.html,
        "summary": dict}`` - the
        summary holds ``run``, the ``analyses.run_summary`` statistics (NaN -> None),
        ``trace_tokens``, ``trace_steps`` and ``noise_floor`` (None without traces).
    """
    config = run.read_config()["config"]
    check_outputs(run.path)
    metrics, evals = read_tables(run)
    records = load_run_records(run) if run.trace_files() else None
    tables = trace_tables(records, estimator) if records is not None else {}
    # Curves carry the run's name, as the trace figures' series do (``figures.style.series_labels``).
    label = f"{config.get('method', 'unknown')} / {run.path.name}"
    written = write_training_figures(_named(metrics, label), _named(evals, label), run.figures_dir)
    if records is not None:
        written += write_trace_figures(records, tables, run.figures_dir)
    summary = {
        "run": run.path.name,
        **_summary(metrics, evals, str(config.get("method", "unknown")), int(config.get("seed", 0) or 0)),
        "trace_tokens": 0 if records is None else len(records),
        "trace_steps": 0 if records is None else int(records["step"].nunique()),
        "noise_floor": None if records is None else json_value(noise_floor(tables)),
    }
    links = figure_links(written, run.path)
    text = run_markdown(run.path.name, config, summary, records, tables, links, estimator)
    write_report_text(text, run.report_path)
    json_path = write_report_json(
        run.path / REPORT_JSON_NAME, run.path.name, "run", key_facts(config), tables, summary=summary
    )
    html_path = write_html_report(
        run.path / HTML_NAME,
        f"entropy-lab report: {run.path.name}",
        _config_line(config).replace("`", ""),
        records,
        TokenText(find_tokenizer(run, config), base=run.path.parent),
        written,
        tables,
    )
    record_written([html_path])
    return {
        "tables": tables,
        "figures": written,
        "report": run.report_path,
        "json": json_path,
        "html": html_path,
        "summary": summary,
    }


# --- several runs ---------------------------------------------------------------------------------


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
        out_dir: where ``report.md``, ``report.json`` and ``figures/*.png|pdf`` go.

    Returns:
        ``{"table": analyses.compare_runs table (empty without metrics), "tightness":
        pooled tightness per method and estimator (empty without traces), "figures": [paths],
        "report": path of report.md, "json": path of report.json}``. ``report.json`` (scope
        ``"compare"``) holds the tables ``runs`` (the listing), ``comparison`` and
        ``tightness``, and per method the key facts of its first run's configuration.
    """
    if not runs or not any(runs.values()):
        raise EntropyLabError("compare_report needs at least one run directory")
    out_dir = Path(out_dir).resolve()
    check_outputs(out_dir)
    figures_dir = out_dir / FIGURES_DIRNAME
    metrics, evals, records, listing = collect(runs)
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
    write_report_text(compare_markdown(listing, table, tightness, figure_links(written, out_dir)), report)
    facts = {method: key_facts(config_record(dirs[0])) for method, dirs in runs.items() if dirs}
    tables = {"runs": pd.DataFrame(listing), "comparison": table, "tightness": tightness}
    json_path = write_report_json(out_dir / REPORT_JSON_NAME, out_dir.name, "compare", facts, tables)
    return {"table": table, "tightness": tightness, "figures": written, "report": report, "json": json_path}
