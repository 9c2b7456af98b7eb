"""``report.html``: one self-contained page per run with its tables, figures and every traced token.

The page holds everything it shows: figures as inline PNG (base64), the tables as HTML
tables, and the per-token view as JSON read by a short inline script; it loads nothing from
the network and needs no server. The per-token view shows the response tokens of one traced
step (all responses, or one chosen sample), each token coloured by a chosen column: the
entropy before or after the update, the measured change, an estimator's prediction or its
residual; hovering a token shows its record.

Deliberate simplifications:

- The residual of an estimator is the calibrated one of ``analyses.residuals``,
  dH - g * omega with g the run's pooled least-squares gain (the ``tightness`` table), so
  that a residual is on the scale of dH; the raw prediction is a column of its own.
- Colours are scaled per step and column: signed columns on a blue-white-red scale
  symmetric about 0 (red = entropy rises), entropy on a white-to-purple scale from 0, each
  saturating at the 98th percentile of |value| over the step's tokens so that one extreme
  token does not wash out the rest (the legend states the scale).
- Only response tokens are in the trace records, so the prompt is not shown; token text
  comes from ``report.tokens`` (ids when the run holds no tokenizer).
- Values are stored with 4 significant digits.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lab.analyses.tightness import MEASURED, as_float, available_estimators, estimator_columns
from entropy_lab.formatting import format_number
from entropy_lab.report.markdown import table_digits
from entropy_lab.report.tokens import TokenText
from entropy_lab.runs import write_text_atomic

HTML_NAME = "report.html"
SIGNIFICANT = 4
RESPONSE_KEYS = ("step", "update", "sample")
"""A traced response: one sample of one update of one step."""
ENTROPY_COLUMNS = {"entropy_before": "entropy before (nats)", "entropy_after": "entropy after (nats)"}
RECORD_FIELDS = ("position", "token_id", "advantage", "ratio", "weight", "intervention_weight", "prob")
"""Record columns shown on hover besides the colour columns."""
INT_FIELDS = ("position", "token_id")


def _rounded(values: np.ndarray) -> list[float | None]:
    """Floats with ``SIGNIFICANT`` digits; NaN and inf -> None (JSON null)."""
    return [float(f"{v:.{SIGNIFICANT}g}") if math.isfinite(v) else None for v in values.tolist()]


def colour_columns(records: pd.DataFrame, tables: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """The columns a token can be coloured by: key, label, whether signed, and how to compute it.

    Entropy before/after, the measured change, then per estimator with finite values its
    prediction and, when the run's pooled gain is finite, its calibrated residual.
    """
    columns: list[dict[str, Any]] = [
        {"key": key, "label": label, "signed": False}
        for key, label in ENTROPY_COLUMNS.items()
        if key in records
    ]
    if MEASURED in records.columns:
        columns.append({"key": MEASURED, "label": "measured ΔH (nats)", "signed": True})
    gains = _pooled_gains(tables)
    names = estimator_columns(records)
    for name in available_estimators(records):
        columns.append({"key": names[name], "label": f"ω {name} (predicted, nats)", "signed": True})
    for name in available_estimators(records):
        gain = gains.get(name, float("nan"))
        if MEASURED in records.columns and math.isfinite(gain):
            label = f"residual ΔH − g ω, {name} (g = {format_number(gain)}, nats)"
            columns.append(
                {"key": f"residual_{name}", "label": label, "signed": True, "of": names[name], "gain": gain}
            )
    return columns


def _pooled_gains(tables: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    table = tables.get("tightness")
    if table is None or not len(table) or "gain" not in table.columns:
        return {}
    return {
        str(row["estimator"]): float(row["gain"]) for _, row in table.drop_duplicates("estimator").iterrows()
    }


def token_payload(
    records: pd.DataFrame, text: TokenText, tables: Mapping[str, pd.DataFrame] | None = None
) -> dict[str, Any]:
    """The per-token view's data: the colour columns and one entry per traced response.

    Returns:
        ``{"columns": [{key, label, signed, and for a residual "of" (the omega column) and
        "gain"}], "fields": [record columns shown on hover],
        "tokenizer": where the token text came from, "responses": [{"step", "update",
        "sample", "advantage", "text": [str], "values": {key: [float | None]}}]}`` (no values
        for a residual column: the page computes dH - gain * omega), responses sorted by step,
        update and sample, tokens by position.
    """
    columns = colour_columns(records, tables or {})
    fields = [f for f in RECORD_FIELDS if f in records.columns]
    keys = [k for k in RESPONSE_KEYS if k in records.columns]
    order = [*keys, "position"] if "position" in records.columns else keys
    frame = records.sort_values(order, kind="stable").reset_index(drop=True) if order else records
    n = len(frame)
    # Every column converted once for all tokens, then cut into responses (one group per response).
    stored: dict[str, list] = {}
    for column in columns:  # a residual is computed by the page from dH, omega and the gain
        if "of" not in column:
            stored[column["key"]] = _rounded(as_float(frame[column["key"]]))
    for field in fields:
        stored[field] = (
            [int(v) for v in frame[field].to_numpy()]
            if field in INT_FIELDS
            else _rounded(as_float(frame[field]))
        )
    ids = frame["token_id"].to_numpy() if "token_id" in frame.columns else np.zeros(n, dtype=int)
    texts = [text.decode(int(i)) for i in ids]
    advantage = _rounded(as_float(frame["advantage"])) if "advantage" in frame.columns else [None] * n
    if keys:
        key_array = frame[keys].to_numpy(dtype=np.int64)  # (n, len(keys))
        starts = (
            np.flatnonzero(np.r_[True, (key_array[1:] != key_array[:-1]).any(axis=1)]) if n else np.zeros(0)
        )
    else:
        key_array, starts = np.zeros((n, 0), dtype=np.int64), np.zeros(1 if n else 0, dtype=int)
    bounds = [*starts.tolist(), n]
    responses = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        entry: dict[str, Any] = {k: int(v) for k, v in zip(keys, key_array[a], strict=True)}
        entry["advantage"] = advantage[a]
        entry["text"] = texts[a:b]
        entry["values"] = {key: values[a:b] for key, values in stored.items()}
        responses.append(entry)
    public = [{k: c[k] for k in ("key", "label", "signed", "of", "gain") if k in c} for c in columns]
    return {"columns": public, "fields": fields, "tokenizer": text.source, "responses": responses}


def html_table(frame: pd.DataFrame) -> str:
    """An HTML table of ``frame`` with the report's number format (``format_number``)."""
    if not len(frame.columns):
        return "<p><em>(empty table)</em></p>"
    digits = table_digits(frame)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False, name=None):
        cells = "".join(
            f"<td>{html.escape(format_number(v, digits[c]))}</td>"
            for c, v in zip(frame.columns, row, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def _json_script(payload: Mapping[str, Any]) -> str:
    # "</" would end the script element early; "<\/" is the same string to JSON.
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("</", "<\\/")


def html_document(
    title: str,
    subtitle: str,
    payload: Mapping[str, Any] | None,
    figure_paths: Sequence[Path],
    tables: Mapping[str, pd.DataFrame],
) -> str:
    """The text of ``report.html`` (see the module docstring); ``payload`` None = no trace records."""
    pngs = [p for p in figure_paths if p.suffix == ".png" and p.is_file()]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>",
        '<nav><a href="#tokens">tokens</a> · <a href="#figures">figures</a> · <a href="#tables">tables</a></nav>'
        "</header>",
        '<section id="tokens"><h2>Per-token view</h2>',
    ]
    if payload is None or not payload["responses"]:
        parts.append("<p>No trace records in this run: train with trace_every &gt; 0.</p>")
    else:
        parts += [
            '<div class="controls">',
            '<label>step <select id="step"></select></label>',
            '<label>response <select id="sample"></select></label>',
            '<label>colour by <select id="column"></select></label>',
            '<span id="legend"></span></div>',
            f'<p class="note">Token text: {html.escape(str(payload["tokenizer"]))}. '
            "Hover a token for its record; ↵ is a newline.</p>",
            '<div id="view"></div><div id="tip" hidden></div>',
        ]
    parts.append("</section>")
    parts.append('<section id="figures"><h2>Figures</h2>')
    parts += [_figure_html(p) for p in pngs] or ["<p>No figures.</p>"]
    parts.append('</section><section id="tables"><h2>Tables</h2>')
    for name, table in tables.items():
        parts.append(
            f"<details><summary>{html.escape(name)} ({len(table)} rows)</summary>{html_table(table)}</details>"
        )
    if not tables:
        parts.append("<p>No trace tables.</p>")
    parts.append("</section>")
    if payload is not None and payload["responses"]:
        parts.append(f'<script type="application/json" id="token-data">{_json_script(payload)}</script>')
        parts.append(f"<script>{SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html_report(
    path: Path,
    title: str,
    subtitle: str,
    records: pd.DataFrame | None,
    text: TokenText,
    figure_paths: Sequence[Path],
    tables: Mapping[str, pd.DataFrame],
) -> Path:
    """Write ``report.html`` to ``path`` atomically; returns ``path``."""
    payload = token_payload(records, text, tables) if records is not None and len(records) else None
    write_text_atomic(html_document(title, subtitle, payload, figure_paths, tables), path)
    return path


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px}
header p{margin:0 0 6px;color:#555}nav a{color:#1a5fb4}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0}
select{font:inherit;max-width:420px}.note{color:#666;font-size:12px;margin:4px 0}
#legend{display:inline-flex;align-items:center;gap:6px;font-size:12px;color:#444}
#legend .bar{width:160px;height:12px;border:1px solid #aaa}
.response{display:flex;gap:10px;align-items:baseline;margin:0;padding:1px 4px;border-bottom:1px solid #f0f0f0}
.response .head{flex:0 0 220px;color:#666;font-size:11px;font-family:ui-monospace,Menlo,Consolas,monospace}
.response .text{font:15px/1.8 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap}
.tok{padding:1px 1px;border-radius:2px;cursor:default}.tok:hover{outline:1px solid #000}
#tip{position:fixed;z-index:10;background:#fff;border:1px solid #999;box-shadow:0 2px 8px #0003;
padding:6px 8px;font-size:12px;pointer-events:none}
#tip td{padding:0 6px}#tip td:first-child{color:#555}
figure{display:inline-block;margin:8px 12px 8px 0;max-width:100%}figure img{max-width:100%}
figcaption{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f5f5f5}
details{margin:4px 0}summary{cursor:pointer}
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById("token-data").textContent);
  const byStep = new Map();
  data.responses.forEach(function (r, i) {
    if (!byStep.has(r.step)) byStep.set(r.step, []);
    byStep.get(r.step).push(i);
  });
  const stepSel = document.getElementById("step");
  const sampleSel = document.getElementById("sample");
  const columnSel = document.getElementById("column");
  const view = document.getElementById("view");
  const tip = document.getElementById("tip");
  const legend = document.getElementById("legend");
  function option(sel, value, text) {
    const o = document.createElement("option");
    o.value = value; o.textContent = text; sel.appendChild(o);
  }
  byStep.forEach(function (_, step) { option(stepSel, step, String(step)); });
  data.columns.forEach(function (c, i) { option(columnSel, i, c.label); });
  const measured = data.columns.findIndex(function (c) { return c.key === "delta_entropy"; });
  columnSel.value = String(measured >= 0 ? measured : 0);
  function fmt(v) {
    if (v === null || v === undefined) return "n/a";
    if (v === 0) return "0";
    const a = Math.abs(v);
    return (a >= 1e-3 && a < 1e4) ? String(Number(v.toPrecision(4))) : v.toExponential(3);
  }
  function label(r) {
    return "sample " + r.sample + (r.update !== undefined ? " · update " + r.update : "") +
      " · A " + (r.advantage > 0 ? "+" : "") + fmt(r.advantage);
  }
  function fillSamples() {
    sampleSel.textContent = "";
    option(sampleSel, "all", "all responses of the step");
    byStep.get(Number(stepSel.value)).forEach(function (i) { option(sampleSel, i, label(data.responses[i])); });
  }
  function valuesOf(r, column) {  // a residual is dH - g omega, from the stored columns
    if (column.of === undefined) return r.values[column.key];
    const dh = r.values.delta_entropy, omega = r.values[column.of];
    return dh.map(function (v, j) {
      return (v === null || omega[j] === null) ? null : v - column.gain * omega[j];
    });
  }
  function scaleOf(indices, column) {
    const values = [];
    indices.forEach(function (i) {
      valuesOf(data.responses[i], column).forEach(function (v) { if (v !== null) values.push(Math.abs(v)); });
    });
    if (!values.length) return 1;
    values.sort(function (a, b) { return a - b; });
    return values[Math.min(values.length - 1, Math.floor(0.98 * (values.length - 1)))] || values[values.length - 1] || 1;
  }
  function mix(rgb, t) {  // white -> rgb by t in [0, 1]
    return "rgb(" + rgb.map(function (c) { return Math.round(255 + (c - 255) * t); }).join(",") + ")";
  }
  const RED = [178, 24, 43], BLUE = [33, 102, 172], PURPLE = [84, 39, 143];
  function colour(v, scale, signed) {
    if (v === null) return ["#eee", "#222"];
    const t = Math.max(-1, Math.min(1, v / scale));
    const bg = signed ? mix(t >= 0 ? RED : BLUE, Math.abs(t)) : mix(PURPLE, Math.max(0, t));
    return [bg, Math.abs(t) > 0.6 ? "#fff" : "#222"];
  }
  function showLegend(column, scale) {
    legend.textContent = "";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.background = column.signed
      ? "linear-gradient(to right, rgb(33,102,172), #fff, rgb(178,24,43))"
      : "linear-gradient(to right, #fff, rgb(84,39,143))";
    const lo = document.createElement("span");
    lo.textContent = column.signed ? fmt(-scale) : "0";
    const hi = document.createElement("span");
    hi.textContent = fmt(scale) + " (98th percentile of |value| in this step)";
    legend.append(lo, bar, hi);
  }
  function record(r, j) {
    const rows = [["token", JSON.stringify(r.text[j])]];
    data.columns.forEach(function (c) { rows.push([c.label, fmt(valuesOf(r, c)[j])]); });
    data.fields.forEach(function (f) { rows.push([f, fmt(r.values[f][j])]); });
    rows.push(["response", label(r) + " · step " + r.step]);
    const table = document.createElement("table");
    rows.forEach(function (row) {
      const tr = table.insertRow();
      tr.insertCell().textContent = row[0];
      tr.insertCell().textContent = row[1];
    });
    return table;
  }
  function render() {
    const step = Number(stepSel.value);
    const column = data.columns[Number(columnSel.value)];
    const stepResponses = byStep.get(step);
    const shown = sampleSel.value === "all" ? stepResponses : [Number(sampleSel.value)];
    const scale = scaleOf(stepResponses, column);
    showLegend(column, scale);
    view.textContent = "";
    shown.forEach(function (i) {
      const r = data.responses[i];
      const line = document.createElement("div");
      line.className = "response";
      const head = document.createElement("span");
      head.className = "head";
      head.textContent = label(r);
      line.appendChild(head);
      const body = document.createElement("span");
      body.className = "text";
      line.appendChild(body);
      const values = valuesOf(r, column);
      r.text.forEach(function (text, j) {
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = text.replace(/\n/g, "\u21b5");
        const c = colour(values[j], scale, column.signed);
        span.style.background = c[0];
        span.style.color = c[1];
        span.dataset.r = i; span.dataset.j = j;
        body.appendChild(span);
      });
      view.appendChild(line);
    });
  }
  view.addEventListener("mouseover", function (e) {
    const t = e.target;
    if (!t.classList.contains("tok")) return;
    tip.textContent = "";
    tip.appendChild(record(data.responses[Number(t.dataset.r)], Number(t.dataset.j)));
    tip.hidden = false;
  });
  view.addEventListener("mousemove", function (e) {
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = Math.min(e.clientY + 14, window.innerHeight - tip.offsetHeight - 8) + "px";
  });
  view.addEventListener("mouseout", function () { tip.hidden = true; });
  stepSel.addEventListener("change", function () { fillSamples(); render(); });
  sampleSel.addEventListener("change", render);
  columnSel.addEventListener("change", render);
  fillSamples();
  render();
})();
"""
