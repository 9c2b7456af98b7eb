"""The noise floor of a measured entropy change: when is a traced ``delta_entropy`` signal?

From one checkpoint of a run, one rollout batch (the one the run drew for the next step)
takes several updates, each from the same weights, optimizer and RNG states, each traced:

- ``zero step`` (the learning rate set to 0, so dtheta = 0 exactly): what recomputing the
  entropy after no change gives, in fp32 and under bf16 autocast. Any nonzero value is
  recomputation noise (a different code path before and after, or a nondeterministic kernel).
- per learning rate, the update in fp32 (the reference) and the same update under bf16
  autocast (forward, backward and the tracer's forwards, as a GPU user trains and traces).
  The bf16 error against fp32 splits in two: the *measurement* part (the bf16 update's
  entropies recomputed in fp32 against its bf16 record) and the *update* part (the bf16 update
  measured in fp32 against the fp32 update: its gradients differ).

Per setting: the typical size of the change (median and RMS |dH|), the error's RMS against
the fp32 update, and its share of the fp32 change (RMS error / RMS dH), Pearson and sign
agreement with the fp32 change. Each update's records are a run directory of their own
(``<out>/<setting>/traces``), so every other table of entropy-lab reads them too.

Simplifications: the rollout is sampled once in fp32 (bf16 changes only the update and the
measurement, so every setting traces the same tokens); the learning rate of the run's
scheduler is replaced for the one update; the optimizer state is the checkpoint's in every
setting (Adam's moments included), so a learning rate scales the same step direction.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropy_lab.config import TrainConfig
from entropy_lab.errors import EntropyLabError
from entropy_lab.records import load_records
from entropy_lab.rollout import response_stats
from entropy_lab.runs import RunDir, write_text_atomic

Callback = Callable[[str, dict], None]
TABLE_NAME = "noise_floor"
KEY = ["sample", "position"]


@dataclass(frozen=True)
class Setting:
    """One traced update of the study: its name, learning rate and autocast precision."""

    name: str
    lr: float
    precision: str  # "fp32" or "bf16"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None


def settings_for(lrs: Sequence[float], bf16: bool = True) -> list[Setting]:
    """The fp32 zero step and each learning rate in fp32, then (optionally) the same under bf16."""
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    out = []
    for p in precisions:  # fp32 first: bf16 autocast is slow on CPUs without bf16 matmul units
        out += [Setting(f"zero-{p}", 0.0, p)] + [Setting(f"lr{lr:g}-{p}", float(lr), p) for lr in lrs]
    return out


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else float("nan")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def floor_row(
    setting: Setting, dh: np.ndarray, reference: np.ndarray | None, fp32_measured: np.ndarray | None
) -> dict:
    """One table row: the size of ``dh`` (n,) and its error against the fp32 update's ``reference`` (n,).

    ``fp32_measured`` (n,) is the same update's change recomputed in fp32 (bf16 settings only):
    the measurement error is ``dh - fp32_measured``, the update error ``fp32_measured - reference``.
    """
    row: dict = {
        "setting": setting.name,
        "lr": setting.lr,
        "precision": setting.precision,
        "tokens": int(dh.size),
        "median_abs_dH": float(np.median(np.abs(dh))) if dh.size else float("nan"),
        "rms_dH": _rms(dh),
        "max_abs_dH": float(np.max(np.abs(dh))) if dh.size else float("nan"),
    }
    if reference is not None:
        err = dh - reference
        scale = _rms(reference)
        row.update(
            rms_error=_rms(err),
            error_share=_rms(err) / scale if scale > 0 else float("nan"),
            pearson_vs_fp32=_pearson(dh, reference),
            sign_agreement=float(np.mean(np.sign(dh) == np.sign(reference))),
        )
        if fp32_measured is not None:
            row["measurement_share"] = _rms(dh - fp32_measured) / scale if scale > 0 else float("nan")
            row["update_share"] = _rms(fp32_measured - reference) / scale if scale > 0 else float("nan")
    return row


def run_noise_floor(
    run: RunDir,
    out: Path,
    *,
    step: int | None = None,
    lrs: Sequence[float] | None = None,
    bf16: bool = True,
    prompts: int | None = None,
    callback: Callback | None = None,
    on_table: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Trace every setting of ``settings_for`` from the checkpoint at ``step``; returns the table.

    Args:
        run: the run directory (it is only read).
        out: where each setting's run directory and the table go.
        step: the checkpoint's step (default: the latest).
        lrs: learning rates of the traced updates (default: the run's own).
        bf16: also trace each setting under bf16 autocast.
        prompts: prompts of the rollout batch (default: the run's ``prompts_per_step``).
        callback: gets ("start", {"total"}) and ("setting", {"done", "total", "name"}) events.
        on_table: gets the table of the settings done so far after each one (so a stopped study keeps them).

    Returns:
        One row per setting (``floor_row``).
    """
    from entropy_lab.trainer.loop import Trainer
    from entropy_lab.trainer.resume import TrainerState

    callback = callback or (lambda event, info: None)
    ckpts = run.checkpoints()
    if not ckpts:
        raise EntropyLabError(f"{run.path} has no checkpoints to start from; train with checkpoint_every > 0")
    step = list(ckpts)[-1] if step is None else step
    ckpt = run.find_checkpoint(step)
    base: TrainConfig = run.train_config()
    cfg = base.replace(model=str(ckpt / "model"), trace_every=1, dtype="float32", trace_eta_grid=None)
    if prompts:
        cfg = cfg.replace(prompts_per_step=prompts)
    settings = settings_for(lrs or (base.lr,), bf16)
    out = Path(out)
    trainer = Trainer(cfg, out / settings[0].name)
    trainer.setup(create_run=False)
    trainer.load_trainer_state(ckpt)
    callback("start", {"total": len(settings)})

    state = copy.deepcopy(trainer.trainer_state(step))  # the optimizer's tensors change in place
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    ro, rewards, _ = trainer.rollout()  # sampled once, in fp32

    measured: dict[str, pd.DataFrame] = {}
    fp32_after: dict[str, np.ndarray] = {}
    for i, setting in enumerate(settings):
        trainer.model.load_state_dict(weights)
        trainer._apply_state(TrainerState.from_dict(copy.deepcopy(state)))
        for group in trainer.optimizer.param_groups:
            group["lr"] = setting.lr
        target = RunDir(out / setting.name)
        target.create(cfg.replace(lr=setting.lr), overwrite=True, extra={"traced_from": str(ckpt)})
        trainer.run = trainer.updater.run = target
        trainer.amp_dtype = setting.amp_dtype
        with warnings.catch_warnings():
            if setting.lr == 0:  # a zero step is meant to leave every logit unchanged
                warnings.filterwarnings("ignore", message="the optimizer step left every traced logit")
            trainer.learn(step + 1, ro, rewards)
        records = load_records(target.trace_path(step + 1))[0].set_index(KEY).sort_index()
        measured[setting.name] = records
        if setting.precision == "bf16":  # the same update's entropies recomputed in fp32
            with torch.no_grad():
                h = response_stats(trainer.model, ro, cfg.micro_batch_size)["entropy"]  # (B, T)
            idx = records.index.to_frame(index=False).to_numpy()
            fp32_after[setting.name] = h[idx[:, 0], idx[:, 1]].double().cpu().numpy()
        if on_table is not None:
            on_table(floor_table(settings[: i + 1], measured, fp32_after))
        callback("setting", {"done": i + 1, "total": len(settings), "name": setting.name})
    trainer.model.load_state_dict(weights)
    return floor_table(settings, measured, fp32_after)


def floor_table(
    settings: Sequence[Setting], measured: dict[str, pd.DataFrame], fp32_after: dict[str, np.ndarray]
) -> pd.DataFrame:
    """The table of ``run_noise_floor`` from each setting's records (indexed by sample, position)."""
    rows = []
    for s in settings:
        rec = measured[s.name]
        dh = rec["delta_entropy"].to_numpy(np.float64)
        ref_name = f"lr{s.lr:g}-fp32" if s.lr > 0 else "zero-fp32"
        reference = None
        if s.lr > 0 and ref_name in measured and ref_name != s.name:  # bf16 rows against fp32
            ref = measured[ref_name].reindex(rec.index)
            reference = ref["delta_entropy"].to_numpy(np.float64)
        fp32_meas = None
        if s.name in fp32_after and reference is not None:
            fp32_before = measured[ref_name].reindex(rec.index)["entropy_before"].to_numpy(np.float64)
            fp32_meas = fp32_after[s.name] - fp32_before
        rows.append(floor_row(s, dh, reference, fp32_meas))
    return pd.DataFrame(rows)


def write_noise_floor(run: RunDir, out: Path, **kwargs) -> tuple[pd.DataFrame, list[Path]]:
    """``run_noise_floor`` and its table, written as ``<out>/noise_floor.csv``."""
    csv = Path(out) / f"{TABLE_NAME}.csv"

    def save(table: pd.DataFrame) -> None:
        write_text_atomic(table.to_csv(index=False), csv)

    table = run_noise_floor(run, out, on_table=save, **kwargs)
    return table, [csv]
