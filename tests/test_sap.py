"""The SAP driver: counts against the formulas, exact masks, compiled training
with masks, rewinding and resuming."""

from __future__ import annotations

import io
import math
from decimal import Decimal, localcontext

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from sap_kernels.reference import prune_by_stable_sort
from sap_kernels.sap import (
    LotteryTicketPolicy,
    OneShotPolicy,
    Pruner,
    SAPPolicy,
    sap_counts,
)
from sap_kernels.sparsity import sap_prune_counts

# the selection kernels (prune) may not be compiled yet: fall back to the reference ops
BACKEND = (
    "cpu"
    if torch._C._dispatch_has_kernel_for_dispatch_key("sap_kernels::prune_masks", "CPU")
    else "reference"
)

POLICIES = [
    SAPPolicy(scope="global"),
    SAPPolicy(scope="layer", p=0.7, q=1.3, eta_r=0.1, gamma=1.5, beta=0.5),
    SAPPolicy(scope="neuron"),
    OneShotPolicy(scope="global"),
    OneShotPolicy(scope="layer", rate=0.3),
    LotteryTicketPolicy(scope="global"),
    LotteryTicketPolicy(scope="neuron"),
]


# --- r_t and c_t against an independent high-precision computation -----------------


def _allowed_rounding(value: Decimal, rounding: str) -> set[int]:
    """ceil/floor of an exact value; where the value lies within 1e-9 (relative) of an
    integer without being one, float64 evaluation may round either way."""
    exact = math.ceil(value) if rounding == "ceil" else math.floor(value)
    allowed = {exact}
    nearest = int(value.to_integral_value())
    if value != nearest and abs(value - nearest) <= Decimal("1e-9") * max(1, abs(value)):
        allowed |= {nearest, nearest + 1} if rounding == "ceil" else {nearest, nearest - 1}
    return allowed


def _check_counts_against_formulas(d, pqi, p, q, eta_r, gamma, beta, r_t, c_t):
    if d == 0 or math.isnan(pqi):
        assert (r_t, c_t) == (d, 0)
        return
    with localcontext() as context:
        context.prec = 60
        p_, q_, one = Decimal(p), Decimal(q), Decimal(1)
        bound = (
            Decimal(d)
            * (one + Decimal(eta_r)) ** (-q_ / (q_ - p_))
            * (one - Decimal(pqi)) ** (q_ * p_ / (q_ - p_))
        )
        assert r_t in _allowed_rounding(bound, "ceil"), (r_t, bound)
        # c_t = floor(d * clamp(gamma (1 - r_t/d), 0, beta)), given the r_t chosen
        fraction = min(max(Decimal(gamma) * (one - Decimal(r_t) / Decimal(d)), 0), Decimal(beta))
        assert c_t in _allowed_rounding(Decimal(d) * fraction, "floor"), (c_t, d * fraction)
    assert 0 <= c_t <= d
    assert c_t <= math.floor(Decimal(beta) * d) + 1  # beta caps (up to rounding)


unit_strategy = st.tuples(
    st.integers(min_value=0, max_value=10**9),
    st.one_of(st.floats(min_value=0.0, max_value=0.999999), st.just(math.nan)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    units=st.lists(unit_strategy, min_size=1, max_size=8),
    p=st.floats(min_value=0.05, max_value=3.0),
    gap=st.floats(min_value=0.01, max_value=3.0),
    eta_r=st.floats(min_value=0.0, max_value=3.0),
    gamma=st.floats(min_value=0.0, max_value=4.0),
    beta=st.floats(min_value=0.0, max_value=1.0),
)
@example(units=[(750, 1 - 670.5 / 750)], p=0.5, gap=0.5, eta_r=0.0, gamma=1.0, beta=0.9)
def test_sap_counts_match_the_formulas(units, p, gap, eta_r, gamma, beta):
    q = p + gap
    d = torch.tensor([u[0] for u in units], dtype=torch.int64)
    pqi = torch.tensor([u[1] for u in units], dtype=torch.float64)
    r_t, c_t = sap_counts(pqi, d, p=p, q=q, eta_r=eta_r, gamma=gamma, beta=beta)
    assert r_t.dtype == c_t.dtype == torch.int64
    for i, (d_i, pqi_i) in enumerate(units):
        _check_counts_against_formulas(
            d_i, pqi_i, p, q, eta_r, gamma, beta, int(r_t[i]), int(c_t[i])
        )


def test_sap_counts_exact_where_the_ratio_form_rounds_down():
    # r = ceil(750 * 0.894) = 671, so c = 750 - 671 = 79 exactly
    pqi = torch.tensor([1 - 670.5 / 750], dtype=torch.float64)
    r_t, c_t = sap_counts(pqi, torch.tensor([750]))
    assert (int(r_t), int(c_t)) == (671, 79)


def test_sparsity_sap_prune_counts_exact_where_the_ratio_form_rounds_down():
    pqi = torch.tensor([1 - 670.5 / 750], dtype=torch.float64)
    r_t, c_t = sap_prune_counts(pqi, torch.tensor([750]))
    assert (int(r_t), int(c_t)) == (671, 79)


def test_beta_caps_and_nan_units_are_left_unpruned():
    pqi = torch.tensor([0.99, math.nan, 0.5, 0.99], dtype=torch.float64)
    d = torch.tensor([1000, 50, 0, 3])
    r_t, c_t = sap_counts(pqi, d, gamma=10.0, beta=0.25)
    assert c_t.tolist() == [250, 0, 0, 0]
    assert r_t[1] == 50


# --- the pruner -----------------------------------------------------------------------


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 24),
        nn.ReLU(),
        nn.Linear(24, 10),
    )


def _perturb_(model: nn.Module, seed: int) -> None:
    """Stands in for training: deterministic changes to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _units_removed(before, after, scope: str) -> torch.Tensor:
    removed = [(b & ~a) for b, a in zip(before, after)]
    if scope == "global":
        return torch.stack([sum(r.sum() for r in removed)])
    if scope == "layer":
        return torch.stack([r.sum() for r in removed])
    return torch.cat([r.reshape(r.shape[0], -1).sum(1) for r in removed])


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{p.scope}")
def test_masks_remove_exactly_the_counts(policy):
    model = _model()
    pruner = Pruner(model, policy, backend=BACKEND)
    for t in range(3):
        _perturb_(model, seed=t)
        pruner.apply_masks_()
        before = [m.clone() for m in pruner.masks]
        weights = [p.detach().clone() for p in pruner.parameters]
        record = pruner.prune()
        assert record.iteration == t
        removed = _units_removed(before, pruner.masks, policy.scope)
        assert torch.equal(removed, record.pruned)
        total = sum(m.numel() for m in before)
        assert record.density_before == sum(int(m.sum()) for m in before) / total
        assert record.density == sum(int(m.sum()) for m in pruner.masks) / total
        assert record.density == pruner.density()
        assert bool((record.pruned <= record.retained).all())
        if isinstance(policy, OneShotPolicy):
            # pruned from the dense weights (snapshotted at iteration 0) to the density
            expected = prune_by_stable_sort(
                pruner.dense_weights,
                None,
                torch.round(pruner._unit_sizes(policy.scope) * (1 - policy.density(t))).long(),
                policy.scope,
            )
            assert record.density == pytest.approx(policy.density(t), abs=0.01)
        else:
            expected = prune_by_stable_sort(weights, before, record.pruned, policy.scope)
        for mask, want in zip(pruner.masks, expected):
            assert torch.equal(mask, want)
        for param, mask in zip(pruner.parameters, pruner.masks):
            assert bool((param[~mask] == 0).all())
    assert [r.iteration for r in pruner.history] == [0, 1, 2]
    assert pruner.history[-1].density < pruner.history[0].density_before == 1.0


def test_sap_record_matches_the_formulas_per_unit():
    model = _model()
    policy = SAPPolicy(scope="neuron", p=0.6, q=1.7, eta_r=0.2, gamma=2.0, beta=0.6)
    pruner = Pruner(model, policy, backend=BACKEND)
    record = pruner.prune()
    r_t, c_t = sap_counts(record.pqi, record.retained, p=0.6, q=1.7, eta_r=0.2, gamma=2.0, beta=0.6)
    assert torch.equal(record.retained_bound, r_t) and torch.equal(record.pruned, c_t)
    assert int(record.pruned.sum()) > 0


def test_undefined_pqi_units_are_left_unpruned():
    model = _model()
    with torch.no_grad():
        model[3].weight[:5] = 0  # rows of zeros: PQI undefined
    pruner = Pruner(model, SAPPolicy(scope="neuron"), backend=BACKEND)
    record = pruner.prune()
    rows = model[0].weight.shape[0]
    assert bool(record.pqi[rows : rows + 5].isnan().all())
    assert record.pruned[rows : rows + 5].tolist() == [0] * 5
    assert bool(pruner.masks[1][:5].all())


def test_custom_filter_and_bad_arguments():
    model = _model()
    pruner = Pruner(model, parameter_filter=lambda name, p: name == "3.weight", backend=BACKEND)
    assert pruner.names == ["3.weight"]
    with pytest.raises(ValueError, match="beta"):
        SAPPolicy(beta=1.5)
    with pytest.raises(ValueError, match="q must be greater"):
        SAPPolicy(p=1.0, q=0.5)
    with pytest.raises(ValueError, match="scope"):
        LotteryTicketPolicy(scope="row")
    with pytest.raises(ValueError, match="selects no parameter"):
        Pruner(model, parameter_filter=lambda name, p: False)


# --- training integration ---------------------------------------------------------------


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def _backend_for(device: str) -> str:
    return BACKEND if device == "cpu" else "auto"


def _sgd_setup(model, device="cpu"):
    torch.manual_seed(1)
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    inputs, targets = inputs.to(device), targets.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    return inputs, targets, optimizer


def _train_dense(model, inputs, targets, optimizer, steps=3):
    for _ in range(steps):  # leaves non-zero momentum at every weight
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_weights_stay_zero_through_20_compiled_training_steps(device):
    from torch.optim.sgd import sgd

    model = _model().to(device)
    inputs, targets, optimizer = _sgd_setup(model, device)
    _train_dense(model, inputs, targets, optimizer)
    pruner = Pruner(model, SAPPolicy(scope="layer"), backend=_backend_for(device))
    pruner.prune()
    params = list(model.parameters())
    momentum = [optimizer.state[p]["momentum_buffer"] for p in params]
    pruned_index = [next(i for i, p in enumerate(params) if p is q) for q in pruner.parameters]
    assert all(bool((momentum[i][~m] != 0).any()) for i, m in zip(pruned_index, pruner.masks))

    @torch.compile(fullgraph=True)
    def training_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        grads = list(torch.autograd.grad(loss, params))
        masked = pruner.masked_gradients([grads[i] for i in pruned_index])
        for i, g in zip(pruned_index, masked):
            grads[i] = g
        with torch.no_grad():
            sgd(
                params,
                grads,
                momentum,
                lr=0.05,
                momentum=0.9,
                weight_decay=1e-2,
                dampening=0.0,
                nesterov=False,
                maximize=False,
                foreach=False,
            )
        pruner.apply_masks_()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        losses = []
        for _ in range(20):
            losses.append(float(training_step(inputs, targets)))
            for param, mask in zip(pruner.parameters, pruner.masks):
                assert bool((param[~mask] == 0).all())
                assert bool((param[mask] != 0).any())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_apply_masks_with_an_eager_optimizer(device):
    model = _model().to(device)
    inputs, targets, optimizer = _sgd_setup(model, device)
    _train_dense(model, inputs, targets, optimizer)
    pruner = Pruner(model, LotteryTicketPolicy(), backend=_backend_for(device))
    pruner.prune()
    apply_masks = torch.compile(pruner.apply_masks_, fullgraph=True)
    for step in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        pruner.mask_gradients_()
        optimizer.step()
        if step == 0:
            # momentum alone moves pruned weights: the masks are what keeps them at 0
            assert any(bool((p[~m] != 0).any()) for p, m in zip(pruner.parameters, pruner.masks))
        apply_masks()
        for param, mask in zip(pruner.parameters, pruner.masks):
            assert bool((param[~mask] == 0).all())


def test_mask_gradients_zeroes_exactly_the_pruned_gradients():
    model = _model()
    pruner = Pruner(model, LotteryTicketPolicy(fraction=0.5), backend=BACKEND)
    pruner.prune()
    inputs, targets, _ = _sgd_setup(model, "cpu")
    nn.functional.cross_entropy(model(inputs), targets).backward()
    pruner.parameters[0].grad = None  # a parameter without a gradient is skipped
    grads = [None if p.grad is None else p.grad.clone() for p in pruner.parameters]
    pruner.mask_gradients_()
    assert pruner.parameters[0].grad is None
    for param, mask, grad in zip(pruner.parameters[1:], pruner.masks[1:], grads[1:]):
        assert torch.equal(param.grad, torch.where(mask, grad, torch.zeros_like(grad)))
        assert bool((grad[~mask] != 0).any())


def test_rewind_restores_initial_values_exactly():
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model, SAPPolicy(scope="neuron"), backend=BACKEND)
    _perturb_(model, seed=3)
    pruner.prune()
    pruner.rewind_()
    masks = dict(zip(pruner.names, pruner.masks))
    for name, param in model.named_parameters():
        if name in masks:
            mask = masks[name]
            assert torch.equal(param[mask], initial[name][mask])
            assert bool((param[~mask] == 0).all()) and not bool(mask.all())
        else:
            assert torch.equal(param, initial[name])


# --- checkpointing ------------------------------------------------------------------------


def _iterate(model, pruner, t):
    _perturb_(model, seed=100 + t)
    pruner.apply_masks_()
    record = pruner.prune()
    pruner.rewind_()
    _perturb_(model, seed=200 + t)
    return record


@pytest.mark.parametrize(
    "policy",
    [SAPPolicy(scope="neuron", eta_r=0.1), OneShotPolicy(), LotteryTicketPolicy(scope="layer")],
    ids=lambda p: f"{p.name}-{p.scope}",
)
def test_resume_after_iteration_2_makes_the_same_decision(policy):
    model = _model()
    pruner = Pruner(model, policy, backend=BACKEND)
    for t in range(2):
        _iterate(model, pruner, t)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buffer)
    uninterrupted = _iterate(model, pruner, 2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model = _model(seed=99)  # different weights until loaded
    fresh = Pruner(fresh_model, SAPPolicy(), backend="auto")  # settings come from the state
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["pruner"])
    assert fresh.policy == policy and fresh.iteration == 2
    resumed = _iterate(fresh_model, fresh, 2)

    for field in ("pqi", "retained", "retained_bound", "pruned"):
        assert torch.equal(getattr(resumed, field), getattr(uninterrupted, field)), field
    assert resumed.iteration == uninterrupted.iteration == 2
    assert resumed.density == uninterrupted.density
    for a, b in zip(fresh.masks, pruner.masks):
        assert torch.equal(a, b)
    for a, b in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_another_model():
    pruner = Pruner(_model(), backend=BACKEND)
    other = Pruner(nn.Sequential(nn.Linear(3, 4)), backend=BACKEND)
    with pytest.raises(ValueError, match="prunes parameters"):
        other.load_state_dict(pruner.state_dict())


@pytest.mark.parametrize("policy", [SAPPolicy(scope="layer"), LotteryTicketPolicy()])
def test_bfloat16_ties_are_pruned_exactly(policy):
    model = _model().to(torch.bfloat16)  # bfloat16 magnitudes tie often
    pruner = Pruner(model, policy, backend=BACKEND)
    before = [m.clone() for m in pruner.masks]
    weights = [p.detach().clone() for p in pruner.parameters]
    ties = sum(w.numel() - w.abs().unique().numel() for w in weights)
    assert ties > 100
    record = pruner.prune()
    expected = prune_by_stable_sort(weights, before, record.pruned, policy.scope)
    for mask, want in zip(pruner.masks, expected):
        assert torch.equal(mask, want)
    assert torch.equal(_units_removed(before, pruner.masks, policy.scope), record.pruned)


def test_one_shot_masks_are_nested_and_density_can_be_given():
    model = _model()
    pruner = Pruner(model, OneShotPolicy(), backend=BACKEND)
    pruner.prune(density=0.5)
    first = [m.clone() for m in pruner.masks]
    _perturb_(model, seed=5)  # later weights do not matter: masks come from the dense snapshot
    record = pruner.prune(density=0.25)
    assert record.density == pytest.approx(0.25, abs=1e-3)
    assert record.density == pruner.density()
    assert all(bool((new <= old).all()) for new, old in zip(pruner.masks, first))
    assert pruner.prune(density=0.5).density == pruner.density()  # a denser target regrows
