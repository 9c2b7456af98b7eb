"""The predicted update equals the step the optimizer then applies, for every supported option."""

from __future__ import annotations

import pytest
import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.update_predict import predict_update


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _loss(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    return ((model(x) - y) ** 2).mean()


OPTIONS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, weight_decay=0.01),
    "sgd-maximize": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-weight-decay": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True, betas=(0.8, 0.95)),
    "adam-single-tensor": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False, eps=1e-6),
}


def _check_steps(opt_fn, *, clip=None, schedule=False, n_steps=5):
    model = _model()
    opt = opt_fn(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0 / (1 + u)) if schedule else None
    worst = 0.0
    for step in range(n_steps):
        opt.zero_grad()
        _loss(model, step).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        predicted = predict_update(opt)
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.step()
        if sched is not None:
            sched.step()
        for p in model.parameters():
            applied = p.detach() - before[p]
            err = (predicted[p] - applied).norm() / applied.norm()
            worst = max(worst, float(err))
    return worst


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_predicted_update_equals_applied_step(name):
    assert _check_steps(OPTIONS[name]) < 1e-6


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_predicted_update_after_clipping_and_under_a_schedule(name):
    assert _check_steps(OPTIONS[name], clip=0.05, schedule=True) < 1e-6


def test_prediction_leaves_the_optimizer_state_untouched():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    _loss(model, 3).backward()
    snapshot = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    params = [p.detach().clone() for p in model.parameters()]
    predict_update(opt)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, snapshot[p][k]), k
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))


def test_parameters_without_gradient_are_left_out():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model, 0).backward()
    model[0].weight.grad = None
    pred = predict_update(opt)
    assert model[0].weight not in pred and model[2].weight in pred


def test_unsupported_optimizer_names_the_supported_ones():
    model = _model()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.1)
    with pytest.raises(EntropyLabError, match="RMSprop.*Adam, AdamW, SGD"):
        predict_update(opt)
