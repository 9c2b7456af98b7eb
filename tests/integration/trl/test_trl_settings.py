"""The TRL trainer honours TRL's settings: the run directory's safety, ``method_overrides`` and trace
arguments checked, and exact records under TRL's default ``bf16=True``.

The precision check is independent of the tracer: the records' entropies before and after the
traced update are compared with an fp64 recomputation of softmax(z / T) by a fresh copy of the
model loaded from disk (before) or from the trained weights (after).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("trl")

import transformers  # noqa: E402
from trl_common import count_reward, dataset, grpo_args, tiny_model_dir  # noqa: E402

from entropy_lab.config import TrainConfig  # noqa: E402
from entropy_lab.errors import EntropyLabError  # noqa: E402
from entropy_lab.integrations.trl import TracedGRPOTrainer  # noqa: E402
from entropy_lab.integrations.trl.methods import TrlSettings, resolve_trl_method  # noqa: E402
from entropy_lab.integrations.trl.run import TrlRunWriter, check_run_dir  # noqa: E402
from entropy_lab.records import load_records  # noqa: E402
from entropy_lab.runs import MARKER, RunDir  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _trainer(model_dir, out, cls=TracedGRPOTrainer, **kw):
    settings = {k: kw.pop(k) for k in list(kw) if k not in ("method", "method_overrides", "overwrite_run", "trace_every", "trace_max_positions")}  # fmt: skip
    return cls(
        model=str(model_dir), reward_funcs=count_reward, args=grpo_args(out, **settings),
        train_dataset=dataset(), **kw,
    )  # fmt: skip


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- output_dir: the same safety as --out ------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_holding_a_model_is_refused_before_loading(model_dir, tmp_path, overwrite):
    before = _files(model_dir)
    with pytest.raises(EntropyLabError, match="holds a Hugging Face model") as err:
        _trainer(model_dir, model_dir, overwrite_run=overwrite)
    assert "--" not in str(err.value) and "output_dir" in str(err.value)
    assert _files(model_dir) == before  # config.json of the model untouched


def _writer(path, overwrite=False):
    return TrlRunWriter(path, TrainConfig(task="trl"), trl_args={}, overwrite=overwrite, is_main=True)


@pytest.mark.parametrize(
    "name,content",
    [("metrics.parquet", b"the user's table"), ("notes.txt", b"mine"), ("config.json", b'{"lr": 1}')],
)
def test_output_dir_with_a_users_file_is_refused(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    for overwrite in (False, True):
        with pytest.raises(EntropyLabError, match="output_dir") as err:
            _writer(tmp_path, overwrite).start(resuming=False)
        assert "--" not in str(err.value)
    assert _files(tmp_path) == {tmp_path.joinpath(name).relative_to(tmp_path): content}


def test_a_run_is_replaced_only_with_overwrite_run_and_only_what_entropy_lab_wrote(model_dir, tmp_path):
    run = tmp_path / "run"
    _trainer(model_dir, run, max_steps=1).train()
    assert (run / MARKER).is_file() and RunDir(run).holds_run()
    with pytest.raises(
        EntropyLabError, match="already holds a run.*resume_from_checkpoint.*overwrite_run=True"
    ):
        _writer(run).start(resuming=False)
    _writer(run, overwrite=True).start(resuming=False)  # a run of entropy-lab's files only: replaced
    assert not (run / "traces").exists() and not (run / "metrics.parquet").exists()
    (run / "checkpoint-1").mkdir()  # what TRL saved for the run being replaced
    (run / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")
    before = _files(run)
    with pytest.raises(EntropyLabError, match=r"did not write \(checkpoint-1/?\)"):
        _writer(run, overwrite=True).start(resuming=False)
    assert _files(run) == before


def test_resume_beside_trls_checkpoints_adds_the_run_and_replaces_nothing(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert check_run_dir(tmp_path, overwrite=False, resuming=True) == "beside"
    _writer(tmp_path).start(resuming=True)
    assert (
        RunDir(tmp_path).holds_run()
        and (tmp_path / "checkpoint-2" / "trainer_state.json").read_text() == "{}"
    )
    other = tmp_path / "other"
    (other / "checkpoint-2").mkdir(parents=True)
    (other / "metrics.parquet").write_bytes(b"someone's")
    with pytest.raises(EntropyLabError, match="holds metrics.parquet but no entropy-lab run"):
        _writer(other).start(resuming=True)
    assert (other / "metrics.parquet").read_bytes() == b"someone's"


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(
        EntropyLabError, match="resume_from_checkpoint and overwrite_run=True exclude each other"
    ):
        check_run_dir(tmp_path, overwrite=True, resuming=True)


# --- method_overrides and the trace arguments --------------------------------------------------

SETTINGS = TrlSettings(
    loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, delta=None, beta=0.0, max_completion_length=6,
    temperature=1.0, seed=0, learning_rate=1e-3, num_generations=4,
)  # fmt: skip


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"lr": 0.1}, r"lr \(GRPOConfig's learning_rate\)"),
        ({"temperature": 0.7}, r"temperature \(GRPOConfig's temperature\)"),
        ({"seed": 3}, r"seed \(GRPOConfig's seed\)"),
        ({"clip_eps_high": 0.3}, r"clip_eps_high \(GRPOConfig's epsilon_high\)"),
        ({"trace_every": "5"}, r"trace_every \(TracedGRPOTrainer\(trace_every=...\)\)"),
        ({"controller": "entropy-target"}, "no effect on the TRL trainer"),
        ({"steer_lambda_min": "0.7"}, "'steer_lambda_min' expects float"),
        ({"steer_lambda_min": 2.5}, "steer_lambda_min"),
        ({1: 0.7}, "keys must be config key names"),
        ([("steer_lambda_min", 0.7)], "must be a mapping"),
        ("steer_lambda_min=0.7", "must be a mapping"),
    ],
)
def test_method_overrides_are_checked(overrides, match):
    with pytest.raises(EntropyLabError, match=match) as err:
        resolve_trl_method("steer", overrides, SETTINGS)
    assert "\n" not in str(err.value)


def _detached_counts(run, step_rows: int) -> list[tuple[int, int, list[int]]]:
    """Per trace file: (detached tokens, valid tokens, valid tokens per micro-batch of ``step_rows`` rows)."""
    out = []
    for f in RunDir(run).trace_files():
        df, _ = load_records(f)
        micro = (df["sample"] // step_rows).value_counts().sort_index().tolist()
        out.append((int((df["intervention_weight"] == 0).sum()), len(df), micro))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clip_cov_chooses_over_the_whole_step_by_default(model_dir, tmp_path):
    """Gradient accumulation 2: the step detaches max(1, int(ratio N_step)) tokens (global), the per-call
    setting max(1, int(ratio N_m)) per micro-batch; every response token is traced, so the records count them."""
    overrides = {"clip_cov_ratio": 0.3, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9}
    counts = {}
    for selection in ("global", "per-call"):
        run = tmp_path / selection
        extra = {} if selection == "global" else {"cov_selection": "per-call"}
        t = _trainer(
            model_dir, run, method="clip-cov", method_overrides={**overrides, **extra}, loss_type="dapo",
            gradient_accumulation_steps=2, max_steps=2, learning_rate=0.3,
        )  # fmt: skip
        assert t._el_cfg.cov_selection == selection
        t.train()
        assert json.loads((run / "config.json").read_text())["config"]["cov_selection"] == selection
        counts[selection] = _detached_counts(run, 4)
    for detached, n, _ in counts["global"]:
        assert detached == max(1, int(0.3 * n))
    for detached, _, micro in counts["per-call"]:
        assert len(micro) == 2 and detached == sum(max(1, int(0.3 * m)) for m in micro)
    assert [c[0] for c in counts["global"]] != [c[0] for c in counts["per-call"]]


def test_controller_methods_are_refused_on_trl():
    with pytest.raises(EntropyLabError, match="use_adaptive_entropy=True"):
        resolve_trl_method("adaptive-entropy", None, SETTINGS)


def test_method_overrides_without_a_method_are_refused(model_dir, tmp_path):
    with pytest.raises(EntropyLabError, match="pass method=... too"):
        _trainer(model_dir, tmp_path, method_overrides={"steer_lambda_min": 0.7})


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"trace_every": "5"}, "trace_every must be a whole number"),
        ({"trace_every": 2.5}, "trace_every must be a whole number"),
        ({"trace_every": -1}, "trace_every must be a whole number"),
        ({"trace_max_positions": "10"}, "trace_max_positions must be None"),
    ],
)
def test_trace_arguments_are_checked(model_dir, tmp_path, kw, match):
    with pytest.raises(EntropyLabError, match=match):
        _trainer(model_dir, tmp_path, **kw)


# --- exact records under TRL's default bf16=True -----------------------------------------------


class KeepBatch(TracedGRPOTrainer):
    """Keeps the traced step's padded batch for the independent recomputation."""

    def _finish_window(self):
        if self._window is not None:
            self.kept = (self._window.input_ids.clone(), self._window.attention_mask.clone())
        super()._finish_window()


def _fp64_entropy(model_dir, state_dict, ids, attn, temperature):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model = model.double().eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.double() / temperature, -1)
    return -(lp.exp() * lp).sum(-1)  # (B, T)


@pytest.mark.parametrize("bf16", [True, False])
def test_records_are_exact_under_bf16_training(model_dir, tmp_path, bf16):
    """Under bf16=True TRL trains in bf16 autocast; the tracer's own forwards stay fp32 (measured:
    max error 7e-7 as in fp32, against 1e-2 / 2e-2 with the autocast applied)."""
    t = _trainer(
        model_dir, tmp_path, cls=KeepBatch, bf16=bf16, max_steps=1, temperature=0.8, learning_rate=0.3
    )
    t.train()
    df, meta = load_records(RunDir(tmp_path).trace_path(1))
    ids, attn = t.kept
    s, p = torch.tensor(df["sample"].to_numpy()), torch.tensor(df["position"].to_numpy()) - 1
    before = _fp64_entropy(model_dir, None, ids, attn, 0.8)[s, p]
    after = _fp64_entropy(model_dir, t.model.state_dict(), ids, attn, 0.8)[s, p]
    assert float((after - before).abs().max()) > 1e-3  # the update moved the entropies: after is a real check
    err_before = float((torch.tensor(df["entropy_before"].to_numpy()) - before).abs().max())
    err_after = float((torch.tensor(df["entropy_after"].to_numpy()) - after).abs().max())
    print(f"bf16={bf16}: max |entropy error| before {err_before:.1e}, after {err_after:.1e}")
    assert err_before < 1e-5 and err_after < 1e-5
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["dtype"] == ("bfloat16" if bf16 else "float32")
    assert meta["trace_precision"] == "float32 weights, no autocast"
    assert isinstance(pd.read_parquet(tmp_path / "metrics.parquet"), pd.DataFrame)
