"""report.html: a self-contained page whose per-token data are the run's records, in order, with their text."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from entropy_lab.config import TrainConfig
from entropy_lab.figures import save_figure, tightness_over_steps
from entropy_lab.records import COLUMNS, save_records
from entropy_lab.report.compose import load_run_records, trace_tables
from entropy_lab.report.html import token_payload, write_html_report
from entropy_lab.report.tokens import TokenText, find_tokenizer
from entropy_lab.runs import RunDir
from entropy_lab.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+-*/()= "
VOID = {"meta", "img", "br", "hr", "input", "link"}


def records_of(step: int, rng: np.random.Generator, samples: int = 3, length: int = 6) -> pd.DataFrame:
    n = samples * length
    entropy = rng.uniform(0.1, 2.0, n)
    measured = rng.normal(scale=1e-2, size=n)
    omega = measured * 1e-5 + rng.normal(scale=1e-8, size=n)
    prob = rng.uniform(0.05, 0.99, n)
    frame = pd.DataFrame(
        {
            "step": step,
            "update": 0,
            "sample": np.repeat(np.arange(samples), length),
            "position": np.tile(np.arange(10, 10 + length), samples),
            "token_id": rng.integers(4, 4 + len(set(ALPHABET)), n),
            "advantage": np.repeat(rng.choice([-1.0, 0.5], samples), length),
            "ratio": 1.0,
            "clip_indicator": 1.0,
            "intervention_weight": 1.0,
            "normalizer": float(n),
            "weight": rng.normal(scale=1e-3, size=n),
            "lr": 1e-3,
            "prob": prob,
            "logprob": np.log(prob),
            "surprisal": -np.log(prob),
            "entropy_before": entropy,
            "entropy_after": entropy + measured,
            "collision": 0.1,
            "delta_entropy": measured,
            "delta_logit_linear": measured,
            "omega_paper": omega * 0.5,
            "omega_sampled_logit": omega * 0.7,
            "omega_softmax": omega,
            "omega_logit_grad": omega,
            "omega_covariance": rng.normal(scale=1e-8, size=n),
        }
    )
    assert list(frame.columns) == list(COLUMNS)
    return frame


def make_run(path, with_tokenizer: bool = True) -> tuple[RunDir, pd.DataFrame]:
    """A run with two traced steps (rows shuffled in the files) and, optionally, a checkpoint tokenizer."""
    run = RunDir(path)
    cfg = TrainConfig(method="grpo", steps=4, lr=1e-3, task="countdown")
    run.create(cfg)
    rng = np.random.default_rng(0)
    frames = []
    for step in (2, 4):
        frame = records_of(step, rng)
        frames.append(frame)
        save_records(frame.sample(frac=1.0, random_state=step), run.trace_path(step), cfg.to_dict())
    if with_tokenizer:
        model = run.checkpoint_path(4) / "model"
        model.mkdir(parents=True)
        build_char_tokenizer(ALPHABET).backend_tokenizer.save(str(model / "tokenizer.json"))
        (run.checkpoint_path(4) / "trainer_state.pt").write_bytes(b"")
    return run, pd.concat(frames, ignore_index=True)


class Page(HTMLParser):
    """Checks that every element closes in order and collects what the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: dict[str, str] = {}
        self.sources: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids[attributes["id"]] = tag
        for key in ("src", "href"):
            if key in attributes:
                self.sources.append(attributes[key])
        if tag == "script":
            self._script = attributes.get("id", "inline")
            self.scripts[self._script] = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == []
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The page as ``run_report`` writes it (its wiring is checked in test_report.py), with one figure."""
    run, records = make_run(tmp_path_factory.mktemp("runs") / "grpo_s0")
    loaded = load_run_records(run)
    tables = trace_tables(loaded)
    figure = save_figure(tightness_over_steps(tables["tightness_by_step"]), run.figures_dir / "tightness")
    text = TokenText(find_tokenizer(run, {}), base=run.path.parent)
    path = write_html_report(
        run.path / "report.html", "entropy-lab report", "grpo", loaded, text, figure, tables
    )
    return run, records, {"html": path, "tables": tables}


def test_report_html_is_self_contained_and_parses(report):
    run, _records, result = report
    text = result["html"].read_text(encoding="utf-8")
    page = parse(text)
    assert {"step", "sample", "column", "view", "token-data"} <= set(page.ids)
    images = [s for s in page.sources if s.startswith("data:image/png;base64,")]
    assert len(images) == 1 and all(s.startswith("#") for s in set(page.sources) - set(images))
    assert "http://" not in text and "https://" not in text  # nothing to load from the network
    assert page.scripts["inline"].strip()  # the view's script is inline
    assert "grpo_s0/checkpoints/step_000004/model/tokenizer.json" in text  # where the text came from
    assert all(name in text for name in result["tables"])  # every table, collapsed


def test_tokens_appear_in_order_with_their_values_and_text(report):
    _run, records, result = report
    data = json.loads(parse(result["html"].read_text(encoding="utf-8")).scripts["token-data"])
    decode = build_char_tokenizer(ALPHABET)
    assert [(r["step"], r["sample"]) for r in data["responses"]] == [(s, i) for s in (2, 4) for i in range(3)]
    response = data["responses"][4]  # step 4, sample 1
    rows = records[(records["step"] == 4) & (records["sample"] == 1)].sort_values("position")
    assert response["values"]["position"] == rows["position"].tolist()
    assert response["text"] == [decode.decode([int(i)]) for i in rows["token_id"]]
    assert all(len(t) == 1 and t in ALPHABET for t in response["text"])
    np.testing.assert_allclose(response["values"]["delta_entropy"], rows["delta_entropy"], rtol=1e-3)
    np.testing.assert_allclose(response["values"]["omega_softmax"], rows["omega_softmax"], rtol=1e-3)
    assert response["advantage"] == pytest.approx(rows["advantage"].iloc[0])
    keys = [c["key"] for c in data["columns"]]
    assert keys[:3] == ["entropy_before", "entropy_after", "delta_entropy"]
    assert "omega_covariance" in keys and "residual_softmax" in keys
    residual = next(c for c in data["columns"] if c["key"] == "residual_softmax")
    pooled = trace_tables(records.assign(method="grpo", run="grpo_s0"))["tightness"]
    assert residual["of"] == "omega_softmax"
    assert residual["gain"] == pytest.approx(pooled.set_index("estimator").loc["softmax", "gain"])


def test_without_a_tokenizer_the_ids_are_shown(tmp_path):
    run, records = make_run(tmp_path / "run", with_tokenizer=False)
    text = TokenText(find_tokenizer(run, {}))
    assert not text.has_tokenizer and "no tokenizer" in text.source
    payload = token_payload(records, text)
    first = records[(records["step"] == 2) & (records["sample"] == 0)]
    assert payload["responses"][0]["text"] == [f"#{i}" for i in first["token_id"]]


def test_a_retrace_directory_uses_its_runs_tokenizer_and_a_bad_file_falls_back(tmp_path):
    run, _records = make_run(tmp_path / "run")
    retrace = RunDir(run.path / "retrace-steer-step_000004")
    retrace.create(TrainConfig(method="steer", steps=5, task="countdown"))
    expected = run.checkpoint_path(4) / "model" / "tokenizer.json"
    assert find_tokenizer(retrace, {}) == expected
    nested = RunDir(run.path / "retrace" / "step_000004")
    nested.create(TrainConfig(method="grpo", steps=5, task="countdown"))
    assert find_tokenizer(nested, {}) == expected
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    text = TokenText(bad)
    assert not text.has_tokenizer and "could not be read" in text.source and text.decode(7) == "#7"


def test_a_run_without_traces_gets_a_page_without_a_token_view(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create(TrainConfig(method="grpo", steps=2, task="countdown"))
    path = write_html_report(tmp_path / "report.html", "t", "s", None, TokenText(None), [], {})
    page = parse(path.read_text(encoding="utf-8"))
    assert "token-data" not in page.ids and "No trace records" in path.read_text()


def chromium(*args: str) -> str:
    """Run headless Chromium (the Debian package ``chromium``) and return its stdout."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,760"]
    done = subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.mark.slow
def test_chromium_renders_the_tokens_and_a_screenshot_that_is_not_blank(report, tmp_path):
    from PIL import Image

    _run, _records, result = report
    url = result["html"].resolve().as_uri()
    dom = chromium("--dump-dom", url)  # the page after its script ran
    data = json.loads(parse(result["html"].read_text(encoding="utf-8")).scripts["token-data"])

    class Tokens(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[list[str]] = []
            self.backgrounds: list[tuple[int, ...]] = []
            self._in = False

        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs)
            classes = attributes.get("class", "")
            if classes == "response":
                self.lines.append([])
            self._in = classes == "tok"
            if self._in:
                rgb = attributes["style"].split("rgb(")[1].split(")")[0]
                self.backgrounds.append(tuple(int(c) for c in rgb.split(",")))

        def handle_endtag(self, tag):
            self._in = False

        def handle_data(self, data):
            if self._in:
                self.lines[-1].append(data)

    rendered = Tokens()
    rendered.feed(dom)
    first_step = [r for r in data["responses"] if r["step"] == data["responses"][0]["step"]]
    assert len(rendered.lines) == len(first_step)  # every response of the first step
    assert rendered.lines[0] == first_step[0]["text"]  # its tokens, in order
    shot = tmp_path / "page.png"
    chromium(f"--screenshot={shot}", url)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)  # (H, W, 3)
    assert (np.abs(pixels - 255).sum(axis=2) > 30).mean() > 0.01  # not a blank page
    colours = np.array(rendered.backgrounds)  # (tokens, 3): coloured by the measured change, both signs
    assert (colours[:, 0] - colours[:, 2] > 20).any() and (colours[:, 2] - colours[:, 0] > 20).any()


def test_a_run_holding_its_report_html_can_still_be_overwritten(report):
    run, _records, result = report
    assert result["html"].parent == run.path
    run.check_removable()  # report.html is a file entropy-lab writes: --overwrite still works
