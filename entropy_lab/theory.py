"""First-order predictions of the per-token entropy change (docs/theory.md sections 1-3).

Every estimator maps the per-token quantities of one update to omega, a prediction
of H_after - H_before at that token (positive = entropy rises). All share the model
of one SGD step of size eta on free logits per state; they differ in what they keep:

- ``paper``: the closed form of the STEER release code, -eta I lambda/N (A/pi_old) pi_a (1-pi_a) l_a.
- ``sampled-logit``: only the sampled logit moves: -eta w pi_a (1-pi_a) l_a.
- ``softmax``: all V logits move: -eta w (pi_a l_a - C). Exact to first order for a weighted
  log-prob loss; equals ``sampled-logit`` + eta w sum_{k != a} pi_k^2 l_k.
- ``logit-grad``: eta sum_k pi_k l_k g_k with g = dLoss/dz the actual gradient, for any loss.
- ``covariance``: -eta (log pi_a - mean log pi)(A - mean A)/N, Cui et al. (2025).

Here w = I_clip r A lambda / N and l_k = log pi_k + H.

Simplifications: the estimators ignore parameter sharing and the optimizer's
preconditioning (that is the ``coupling`` term the tracer measures), and second order
terms (``curvature``). Batch means of ``covariance`` are taken over the tokens passed in.

References: Hao et al. 2025 (STEER, arXiv 2510.10150); Cui et al. 2025 (the entropy
mechanism of RL for reasoning LMs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch

from entropy_lab.errors import EntropyLabError
from entropy_lab.records import predicted_column
from entropy_lab.registry import Registry


@dataclass
class TokenQuantities:
    """Per-token inputs of the estimators; every tensor is (n,) over the same n tokens.

    ``logprob``, ``entropy`` and ``collision`` describe pi at the pre-update parameters.
    Scalars may be given as Python floats or (n,) tensors.
    """

    logprob: torch.Tensor  # (n,) log pi_a
    entropy: torch.Tensor  # (n,) H
    collision: torch.Tensor  # (n,) C = sum_k pi_k^2 l_k
    advantage: torch.Tensor  # (n,) A
    old_logprob: torch.Tensor  # (n,) log pi_old(a)
    clip_indicator: torch.Tensor | float = 1.0  # (n,) I_clip
    intervention_weight: torch.Tensor | float = 1.0  # (n,) lambda
    normalizer: torch.Tensor | float = 1.0  # (n,) N
    lr: torch.Tensor | float = 1.0  # eta
    logit_grad_dot: torch.Tensor | None = None  # (n,) sum_k pi_k l_k g_k, g = dLoss/dz
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further per-token inputs (n,) by name, for estimators that declare them in ``requires``;
    a producer (e.g. the tracer, when asked) fills only the ones it computed."""

    def has(self, name: str) -> bool:
        """Whether input ``name`` (an optional field or a key of ``inputs``) is present."""
        if name in _FIELD_NAMES:
            return getattr(self, name) is not None
        return name in self.inputs

    @property
    def prob(self) -> torch.Tensor:
        return self.logprob.exp()

    @property
    def ratio(self) -> torch.Tensor:
        return (self.logprob - self.old_logprob).exp()

    @property
    def l_a(self) -> torch.Tensor:
        """log pi_a + H: positive exactly when pi_a > exp(-H)."""
        return self.logprob + self.entropy

    @property
    def weight(self) -> torch.Tensor:
        """w = I_clip * r * A * lambda / N."""
        return self.clip_indicator * self.ratio * self.advantage * self.intervention_weight / self.normalizer

    def select(self, mask: torch.Tensor) -> TokenQuantities:
        """The same quantities restricted to ``mask`` (n,) bool."""
        kw: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[mask] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        kw["inputs"] = {k: v[mask] for k, v in self.inputs.items()}
        return TokenQuantities(**kw)


_FIELD_NAMES = frozenset(f.name for f in fields(TokenQuantities))

Estimator = Callable[[TokenQuantities], torch.Tensor]
"""Maps the quantities of n tokens to omega, (n,)."""


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator: its function and the inputs it cannot do without.

    Calling the spec calls the function. ``requires`` names optional ``TokenQuantities``
    fields (e.g. ``logit_grad_dot``) or keys of ``TokenQuantities.inputs``; where one is
    absent the estimator is not computed at all (no column of NaN).
    """

    name: str
    fn: Estimator
    requires: frozenset[str] = frozenset()

    def __call__(self, q: TokenQuantities) -> torch.Tensor:
        return self.fn(q)

    @property
    def column(self) -> str:
        """The trace-record column: ``omega_`` + name with '-' as '_'."""
        return predicted_column(self.name)

    def missing(self, q: TokenQuantities) -> list[str]:
        """The required inputs ``q`` lacks."""
        return sorted(r for r in self.requires if not q.has(r))


ESTIMATORS: Registry[EstimatorSpec] = Registry("estimator")


def register_estimator(name: str, requires: Iterable[str] = ()) -> Callable[[Estimator], Estimator]:
    """Decorator: register an estimator under ``name`` (kebab-case), needing the inputs ``requires``.

    The trace records gain the column ``predicted_column(name)``; the analyses, figures and
    reports pick it up from there. Underscores are refused so that the column maps back to
    one name.
    """
    if not name or "_" in name or name != name.strip():
        raise EntropyLabError(f"estimator name {name!r} must be non-empty kebab-case (use '-', not '_')")
    needs = frozenset(requires)

    def add(fn: Estimator) -> Estimator:
        ESTIMATORS.add(name, EstimatorSpec(name, fn, needs))
        return fn

    return add


def unregister_estimator(name: str) -> None:
    """Remove estimator ``name`` (e.g. one a test or notebook registered)."""
    ESTIMATORS.remove(name)


get_estimator = ESTIMATORS.__getitem__


@register_estimator("paper")
def omega_paper(q: TokenQuantities) -> torch.Tensor:
    """-eta I lambda/N (A/pi_old) pi_a (1 - pi_a) l_a, as in the STEER release code.

    Since (A/pi_old) pi_a = r A, this is -eta w (1 - pi_a) l_a: the sampled-logit form
    with one factor pi_a fewer.
    """
    p = q.prob
    old_p = q.old_logprob.exp()
    scale = q.lr * q.clip_indicator * q.intervention_weight / q.normalizer
    return -scale * (q.advantage / old_p) * p * (1 - p) * q.l_a


@register_estimator("sampled-logit")
def omega_sampled_logit(q: TokenQuantities) -> torch.Tensor:
    """-eta w pi_a (1 - pi_a) l_a.

    Derivation: the loss -w log pi_a has dLoss/dz_a = -w (1 - pi_a); one SGD step moving
    only z_a gives dz_a = eta w (1 - pi_a), and dH = (dH/dz_a) dz_a = -pi_a l_a dz_a.
    """
    p = q.prob
    return -q.lr * q.weight * p * (1 - p) * q.l_a


@register_estimator("softmax")
def omega_softmax(q: TokenQuantities) -> torch.Tensor:
    """-eta w (pi_a l_a - C).

    Derivation: with all V logits free, dz = -eta dLoss/dz = eta w (e_a - pi), and
    dH = -sum_k pi_k l_k dz_k = -eta w (pi_a l_a - sum_k pi_k^2 l_k). Equivalently
    -eta w Cov_{k~pi}(log pi_k, e_a - pi).
    """
    return -q.lr * q.weight * (q.prob * q.l_a - q.collision)


@register_estimator("logit-grad")
def omega_logit_grad(q: TokenQuantities) -> torch.Tensor:
    """eta sum_k pi_k l_k g_k with g = dLoss/dz the actual gradient at this position.

    Derivation: dz = -eta g and dH/dz_k = -pi_k l_k. Equals ``softmax`` for a weighted
    log-prob loss, and also covers KL penalties, entropy bonuses and any other term.
    NaN where the gradient was not captured.
    """
    if q.logit_grad_dot is None:
        return torch.full_like(q.logprob, float("nan"))
    return q.lr * q.logit_grad_dot


@register_estimator("covariance")
def omega_covariance(q: TokenQuantities) -> torch.Tensor:
    """-eta (log pi_a - mean log pi)(A - mean A) / N, means over the tokens given.

    The per-token term of the covariance law of Cui et al. (2025): the batch entropy
    change is about -eta Cov(log pi, A); Clip-Cov and KL-Cov rank tokens by this term.
    """
    centred_lp = q.logprob - q.logprob.mean()
    centred_a = q.advantage - q.advantage.mean()
    return -q.lr * centred_lp * centred_a / q.normalizer


@register_estimator("paper-appendix")
def omega_paper_appendix(q: TokenQuantities) -> torch.Tensor:
    """-eta w (1 - pi_a)^2 l_a: the per-sample term of the STEER paper's expectation form.

    The paper's appendix writes the expected entropy change as an expectation over a ~ pi of
    -eta r A (1 - pi_a)^2 (log pi_a + H). Reading: dH = -E_{k~pi}[l_k d log pi_k] holds exactly
    to first order; keep only the drawn token's own change d log pi_a = (1 - pi_a) dz_a with
    dz_a = eta w (1 - pi_a) (only the sampled logit moves), and let the draw a ~ pi stand in
    for the expectation. Per token this is ``paper`` times (1 - pi_a), and ``sampled-logit``
    times (1 - pi_a) / pi_a: it drops the renormalisation of the other log-probabilities
    (-pi_a dz_a each), so it is not the first-order change in the tabular model.
    """
    p = q.prob
    return -q.lr * q.weight * (1 - p) ** 2 * q.l_a


def predict_all(q: TokenQuantities) -> dict[str, torch.Tensor]:
    """Every registered estimator whose required inputs ``q`` has: name -> (n,) omega."""
    return {name: spec(q) for name, spec in ESTIMATORS.items() if not spec.missing(q)}
