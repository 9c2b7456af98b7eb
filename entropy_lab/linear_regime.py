"""The linear regime: the traced tokens' entropy along the actual update direction, theta + eta dtheta.

First-order theory holds as eta -> 0. Sweeping eta over a geometric grid shows where it
stops holding and what each estimator misses: the logit-space ``curvature`` (measured -
delta_logit_linear) vanishes relative to the change as eta -> 0, the ``coupling`` of the
tabular estimators (delta_logit_linear - eta * omega_logit_grad: parameter sharing and
the optimizer's preconditioning) does not.

How: at the optimizer pre-step hook (parameters untouched, gradients final) the tracer,
given ``eta_grid``, calls ``record_eta_sweep``: dtheta = the optimizer's next step
(``entropy_lab.update_predict``); for each eta one no-grad forward over the traced rows with
every parameter slot temporarily holding theta + eta dtheta (``shifted_parameters``: one
shifted tensor per parameter, the originals put back in ``finally``; no model copy), and one
forward-mode pass for H(z + eta J dtheta). The results ride along in the records as extra
columns ``regime@<eta>:<quantity>``; ``analyses.regime.regime_table`` turns them into, per eta, each
estimator's Pearson and least-squares gain (predictions scaled by eta, so a first-order
estimator has gain -> 1 as eta -> 0) and the shares of curvature and coupling.

Shares: ||part||^2 / ||measured||^2 over the tokens of each eta; coupling raw (against eta *
omega_logit_grad) and calibrated (against g * eta * omega_logit_grad, g its least-squares gain
at that eta), so that a wrong scale is not mistaken for a wrong pattern.

Simplifications: one traced update; predictions of the linear estimators are scaled by eta
(their first order is linear in the step); the jvp-entropy prediction is recomputed per eta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from entropy_lab.analyses.regime import regime_table
from entropy_lab.errors import EntropyLabError
from entropy_lab.jvp import jvp_estimates, tangent_of, tangent_parameters
from entropy_lab.records import regime_column
from entropy_lab.stats import entropy_change_stats
from entropy_lab.update_predict import Update, predict_update

DEFAULT_ETAS: tuple[float, ...] = tuple(2.0**k for k in range(-6, 2))
"""1/64, 1/32, ..., 1, 2: multiples of the actual step."""


@contextlib.contextmanager
def shifted_parameters(model: nn.Module, update: Update, eta: float) -> Iterator[None]:
    """Inside the block (no grad), every parameter in ``update`` reads theta + eta * dtheta; restored after."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    shifted: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or p not in update:
                        continue
                    if id(p) not in shifted:  # tied parameters share one shifted tensor
                        shifted[id(p)] = p.detach() + eta * update[p].to(p.dtype)
                    swapped.append((module, name, p))
                    module._parameters[name] = shifted[id(p)]  # type: ignore[assignment]  # a plain tensor in the slot
            yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


def record_eta_sweep(
    step, optimizer: torch.optim.Optimizer, etas: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The sweep for a ``TraceStep`` at its pre-step hook: column name -> (n,) values, per eta and quantity."""
    if not etas or any(not (e > 0) for e in etas):
        raise EntropyLabError(f"the eta grid must hold positive multiples of the step, got {list(etas)}")
    z_before = step.capture.z_before  # (n, V)
    h_before = step._pre_stats.entropy.double()  # (n,)
    n, dev = z_before.shape[0], z_before.device
    every = torch.ones(n, dtype=torch.bool, device=dev)
    update = predict_update(optimizer)
    cols: dict[str, torch.Tensor] = {}
    for eta in etas:
        h_eta = torch.empty(n, dtype=torch.float64, device=dev)
        lin_eta = torch.empty(n, dtype=torch.float64, device=dev)
        with shifted_parameters(step.model, update, eta):
            for idx, z in step.forward.traced_logits(every):
                h, lin, _ = entropy_change_stats(z_before[idx], z, chunk_bytes=step.tracer.chunk_bytes)
                h_eta[idx], lin_eta[idx] = h.double(), lin.double()
        cols[regime_column(eta, "delta_entropy")] = h_eta - h_before
        cols[regime_column(eta, "delta_logit_linear")] = lin_eta
    jvp_cols = {eta: torch.empty(n, dtype=torch.float64, device=dev) for eta in etas}
    with tangent_parameters(step.model, update):
        for idx, z in step.forward.traced_logits(every):
            dz = tangent_of(z)  # (k, V)
            for eta in etas:
                jvp_cols[eta][idx] = jvp_estimates(z_before[idx], eta * dz)[1].double()
    for eta in etas:
        cols[regime_column(eta, "jvp_entropy")] = jvp_cols[eta]
    return cols


def sweep_checkpoint(run, step: int | None = None, etas: Sequence[float] = DEFAULT_ETAS, callback=None):
    """One traced update from a checkpoint with the eta sweep (and the jvp estimators).

    Writes the records to ``run/eta-sweep-step_N/traces/`` and ``linear_regime.png`` to that
    directory's figures; returns (tightness, shares, the figure's path). The checkpoint is untouched.
    """
    from entropy_lab.figures.regime import linear_regime_figure
    from entropy_lab.figures.save import save_figure
    from entropy_lab.methods import resolve_config
    from entropy_lab.records import load_records
    from entropy_lab.runs import RunDir
    from entropy_lab.trainer.loop import Trainer

    ckpts = run.checkpoints()
    if not ckpts:
        raise EntropyLabError(f"{run.path} has no checkpoints to sweep from")
    step = list(ckpts)[-1] if step is None else step
    if step not in ckpts:
        raise EntropyLabError(
            f"{run.path} has no checkpoint at step {step}; available: {', '.join(map(str, ckpts))}"
        )
    base = run.train_config()
    cfg = resolve_config(
        base.method, {"model": str(ckpts[step] / "model"), "trace_every": 1, "trace_jvp": True}, base=base
    )
    target = RunDir(Path(run.path) / f"eta-sweep-step_{step:06d}")
    target.create(cfg, overwrite=True, extra={"traced_from": str(ckpts[step])})
    trainer = Trainer(cfg, target.path, callback=callback)
    trainer.setup(create_run=False)
    trainer.load_trainer_state(ckpts[step])
    trainer.tracer.eta_grid = tuple(etas)
    trainer.train_step(step + 1)
    records = pd.concat([load_records(f)[0] for f in target.trace_files()], ignore_index=True)
    tightness, shares = regime_table(records)
    paths = save_figure(linear_regime_figure(tightness, shares), target.figures_dir / "linear_regime")
    return tightness, shares, paths[0]


def eta_sweep_command(run, step: int | None, output: str = "table") -> None:
    """``entropy-lab trace --run CKPT --eta-sweep``: sweep, then print the tables (or JSON) and the figure path."""
    import json

    from entropy_lab.cli.common import console, print_table, quiet_transformers

    quiet_transformers()
    if output == "table":
        console.print(f"eta sweep of one update of {run.path} from its checkpoint ...")
    tightness, shares, figure = sweep_checkpoint(run, step)
    if output == "json":
        print(
            json.dumps(
                {
                    "tightness": tightness.to_dict("records"),
                    "shares": shares.to_dict("records"),
                    "figure": str(figure),
                },
                indent=2,
            )
        )
        return
    wide = tightness.pivot(index="eta", columns="estimator", values="pearson").reset_index()
    print_table(
        wide, "linear regime: Pearson per estimator against the measured change at theta + eta dtheta"
    )
    wide = tightness.pivot(index="eta", columns="estimator", values="gain").reset_index()
    print_table(wide, "linear regime: least-squares gain of the eta-scaled prediction (1 = right scale)")
    print_table(
        shares, "linear regime: shares of ||measured||^2 (curvature -> 0 as eta -> 0; coupling stays)"
    )
    console.print(f"figure: {figure}")
