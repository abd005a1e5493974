"""ps/rules.py: SGD against torch.optim.SGD, the SGD rule's state, and the weighted mean."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers_unit import property_settings
from paramhub.common.codec import Piece, whole_regions
from paramhub.ps.rules import AdamWRule, AveragingRule, LRSchedule, SGDRule, WeightedMean, sgd_step

pytestmark = pytest.mark.timeout(60)

CONFIGS = [
    dict(momentum=0.0, weight_decay=0.0, nesterov=False),
    dict(momentum=0.0, weight_decay=1e-4, nesterov=False),
    dict(momentum=0.9, weight_decay=0.0, nesterov=False),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=False),
    dict(momentum=0.9, weight_decay=0.0, nesterov=True),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=True),
]


def torch_sgd_trajectory(start: torch.Tensor, grads: list[torch.Tensor], lr: float, **config) -> list[torch.Tensor]:
    """Weights after each step of torch.optim.SGD fed ``grads``."""
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([param], lr=lr, foreach=False, **config)
    out = []
    for g in grads:
        param.grad = g.clone()
        opt.step()
        out.append(param.detach().clone())
    return out


def random_problem(seed: int, size: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=gen)
    grads = [torch.randn(size, generator=gen) for _ in range(steps)]
    return start, grads


@pytest.mark.parametrize("into_grad", [False, True], ids=["fresh", "into-grad"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "m{momentum}-wd{weight_decay}-n{nesterov}".format(**c))
def test_sgd_step_matches_torch_optim_sgd(config, into_grad):
    """Also when the new weights are written over the gradient, as the server does."""
    start, grads = random_problem(seed=1, size=257, steps=5)
    expected = torch_sgd_trajectory(start, grads, lr=0.05, **config)
    params, buf = start.clone(), None
    for step, g in enumerate(grads):
        old_params, grad = params.clone(), g.clone()
        new_params, buf = sgd_step(params, grad, buf, lr=0.05, out=grad if into_grad else None, **config)
        assert torch.equal(params, old_params)  # never the current weights: a pull may be streaming them
        assert into_grad == (new_params.data_ptr() == grad.data_ptr())
        assert (buf is None) == (config["momentum"] == 0)
        if buf is not None:  # the momentum buffer is the rule's own
            assert buf.data_ptr() != grad.data_ptr()
        torch.testing.assert_close(new_params, expected[step], rtol=1e-6, atol=1e-7)
        params = new_params


@property_settings(30)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 64), steps=st.integers(1, 6),
       lr=st.floats(1e-4, 1.0), config=st.sampled_from(CONFIGS), scale=st.floats(1e-3, 1e3))
def test_sgd_step_matches_torch_property(seed, size, steps, lr, config, scale):
    start, grads = random_problem(seed, size, steps)
    grads = [g * scale for g in grads]
    expected = torch_sgd_trajectory(start, grads, lr=lr, **config)
    rule = SGDRule(lr=lr, **config)
    state: dict[str, torch.Tensor] = {}
    params = start.clone()
    for version, g in enumerate(grads):
        params = rule.apply(params, g, state, version)
        torch.testing.assert_close(params, expected[version], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "m{momentum}-wd{weight_decay}-n{nesterov}".format(**c))
def test_sgd_step_never_writes_params_or_grad(config):
    start, grads = random_problem(seed=2, size=33, steps=3)
    params, buf = start.clone(), None
    for g in grads:
        old_params, old_grad = params.clone(), g.clone()
        new_params, buf = sgd_step(params, g, buf, lr=0.1, **config)
        assert torch.equal(params, old_params)  # a pull may still be streaming these
        assert torch.equal(g, old_grad)
        assert new_params.data_ptr() != params.data_ptr()
        assert not torch.equal(new_params, params)
        if buf is not None:  # the momentum buffer is the rule's own, never an alias of the inputs
            assert buf.data_ptr() not in (params.data_ptr(), g.data_ptr(), new_params.data_ptr())
        params = new_params


def test_sgd_rule_keeps_momentum_across_calls():
    start, grads = random_problem(seed=3, size=16, steps=4)
    config = dict(momentum=0.9, weight_decay=1e-4, nesterov=True)
    expected = torch_sgd_trajectory(start, grads, lr=0.1, **config)
    rule = SGDRule(lr=0.1, **config)
    state: dict[str, torch.Tensor] = {}
    params = start.clone()
    for version, g in enumerate(grads):
        params = rule.apply(params, g, state, version)
        assert set(state) == {"momentum_buffer"}
        torch.testing.assert_close(params, expected[version])
    # Losing the state gives a different (first-step) update: the state is what carries momentum.
    fresh_state: dict[str, torch.Tensor] = {}
    restarted = rule.apply(expected[-2], grads[-1], fresh_state, 99)
    assert not torch.allclose(restarted, expected[-1])


def test_sgd_rule_restores_from_checkpointed_state():
    start, grads = random_problem(seed=4, size=16, steps=4)
    rule = SGDRule(lr=0.1, momentum=0.9)
    state: dict[str, torch.Tensor] = {}
    params = start.clone()
    for version, g in enumerate(grads[:2]):
        params = rule.apply(params, g, state, version)
    saved = {k: v.clone() for k, v in state.items()}
    resumed_params, resumed_state = params.clone(), saved
    for version, g in enumerate(grads[2:], start=2):
        params = rule.apply(params, g, state, version)
        resumed_params = rule.apply(resumed_params, g, resumed_state, version)
    assert torch.equal(params, resumed_params)
    expected = torch_sgd_trajectory(start, grads, lr=0.1, momentum=0.9)
    torch.testing.assert_close(params, expected[-1])


def test_sgd_rule_without_momentum_keeps_no_state():
    rule = SGDRule(lr=0.5)
    state: dict[str, torch.Tensor] = {}
    out = rule.apply(torch.ones(3), torch.full((3,), 2.0), state, 0)
    assert torch.equal(out, torch.zeros(3))
    assert state == {}


# -- WeightedMean ---------------------------------------------------------------------------------


def test_weighted_mean_matches_plain_torch():
    gen = torch.Generator().manual_seed(0)
    contributions = [[torch.randn(11, generator=gen), torch.randn(2, 3, generator=gen).reshape(-1)]
                     for _ in range(4)]
    weights = [32.0, 8.0, 1.0, 17.0]
    mean = WeightedMean([t for t in contributions[0]])
    for tensors, w in zip(contributions, weights):
        mean.add(whole_regions(tensors), w)
    assert mean.count == 4 and mean.total_weight == sum(weights)
    got = mean.mean_()
    for i in range(2):
        stacked = torch.stack([c[i].double() for c in contributions])
        w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
        expected = (stacked * w).sum(0) / w.sum()
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i], expected.float())


@property_settings(30)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), size=st.integers(1, 40),
       weights=st.lists(st.integers(1, 1000), min_size=6, max_size=6))
def test_weighted_mean_property(seed, n, size, weights):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, generator=gen) * 10 for _ in range(n)]
    mean = WeightedMean([xs[0]])
    for x, w in zip(xs, weights):
        mean.add(whole_regions([x]), float(w))
    expected = sum(w * x.double() for x, w in zip(xs, weights)) / sum(weights[:n])
    torch.testing.assert_close(mean.mean_()[0], expected.float(), rtol=1e-5, atol=1e-5)


def test_weighted_mean_of_one_tensor_is_that_tensor():
    x = torch.randn(7, generator=torch.Generator().manual_seed(5))
    mean = WeightedMean([x])
    mean.add(whole_regions([x]), 4.0)  # a power of two: exact in float32
    assert torch.equal(mean.mean_()[0], x)


def test_weighted_mean_rounds_integers():
    like = [torch.zeros(3), torch.zeros(3, dtype=torch.int64)]
    mean = WeightedMean(like)
    mean.add(whole_regions([torch.zeros(3), torch.tensor([10, 1, 100], dtype=torch.int64)]), 1.0)
    mean.add(whole_regions([torch.ones(3), torch.tensor([13, 2, 103], dtype=torch.int64)]), 2.0)
    floats, ints = mean.mean_()
    assert ints.dtype == torch.int64
    # (10 + 26) / 3 = 12, (1 + 4) / 3 = 1.67 -> 2, (100 + 206) / 3 = 102
    assert ints.tolist() == [12, 2, 102]
    torch.testing.assert_close(floats, torch.full((3,), 2 / 3))


def test_weighted_mean_does_not_alias_inputs_and_hands_over_its_means():
    x = torch.ones(4)
    mean = WeightedMean([x])
    mean.add(whole_regions([x]), 1.0)
    x.fill_(50.0)
    first = mean.mean_()[0]
    assert torch.equal(first, torch.ones(4))
    mean.reset()  # the handed-over mean is no longer the sums: writing it changes nothing
    first.fill_(100.0)
    mean.add(whole_regions([torch.full((4,), 3.0)]), 1.0)
    assert torch.equal(mean.mean_()[0], torch.full((4,), 3.0))


def test_weighted_mean_adds_pieces_and_sparse_pieces_like_the_dense_tensor():
    """A push arrives as chunks (and top-k as index/value pairs): the same sums as the whole tensor."""
    gen = torch.Generator().manual_seed(8)
    dense = torch.randn(10, generator=gen)
    indices = torch.tensor([1, 4, 9])
    values = torch.randn(3, generator=gen)
    pieces = [Piece(0, dense[:4], 0), Piece(0, dense[4:], 4), Piece(1, values.bfloat16(), indices=indices)]
    mean = WeightedMean([torch.zeros(10), torch.zeros(10)])
    mean.add(pieces, 2.0, [0.5, 1.0])
    scattered = torch.zeros(10).index_put_((indices,), values.bfloat16().float())
    mean.add(whole_regions([dense, scattered]), 2.0, [0.5, 1.0])
    first, second = mean.mean_()
    torch.testing.assert_close(first, dense * 0.5)
    torch.testing.assert_close(second, scattered)


def test_weighted_mean_reuses_spare_memory_that_fits():
    like = [torch.zeros(5), torch.zeros(2, dtype=torch.int64)]
    mean = WeightedMean(like)
    mean.add(whole_regions([torch.ones(5), torch.ones(2, dtype=torch.int64)]), 1.0)
    floats, _ = mean.mean_()
    spare = [torch.full((5,), 7.0), torch.full((3,), 7.0)]  # the second does not fit any region
    mean.reset(spare)
    mean.add(whole_regions([torch.full((5,), 2.0), torch.ones(2, dtype=torch.int64)]), 1.0)
    again, ints = mean.mean_()
    assert again.data_ptr() == spare[0].data_ptr()  # zeroed, then used as the sums
    assert torch.equal(again, torch.full((5,), 2.0)) and ints.tolist() == [1, 1]
    assert torch.equal(floats, torch.ones(5))  # the earlier mean is untouched


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_weighted_mean_accumulates_narrow_dtypes_like_a_float32_copy(wire):
    gen = torch.Generator().manual_seed(6)
    size = WeightedMean._SLICE * 2 + 17  # several slices and a ragged end
    pushes = [torch.randn(size, generator=gen).to(wire) for _ in range(3)]
    mean = WeightedMean([torch.zeros(size)])
    for i, p in enumerate(pushes):
        mean.add(whole_regions([p]), float(i + 1), [0.5])
    expected = sum((i + 1) * 0.5 * p.float() for i, p in enumerate(pushes)) / 6.0
    torch.testing.assert_close(mean.mean_()[0], expected)


def test_weighted_mean_reset():
    mean = WeightedMean([torch.zeros(2)])
    mean.add(whole_regions([torch.tensor([100.0, 100.0])]), 5.0)
    mean.reset()
    assert mean.count == 0 and mean.total_weight == 0.0
    with pytest.raises(ValueError, match="nothing"):
        mean.mean_()
    mean.add(whole_regions([torch.tensor([1.0, 3.0])]), 2.0)
    assert mean.mean_()[0].tolist() == [1.0, 3.0]


@pytest.mark.parametrize("weight", [0.0, -1.0, -1e-9])
def test_weighted_mean_rejects_non_positive_weight(weight):
    mean = WeightedMean([torch.zeros(2)])
    mean.add(whole_regions([torch.ones(2)]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        mean.add(whole_regions([torch.full((2,), 9.0)]), weight)
    assert mean.count == 1 and mean.total_weight == 1.0  # the refused add changed nothing
    assert mean.mean_()[0].tolist() == [1.0, 1.0]


def test_weighted_mean_of_nothing_raises():
    with pytest.raises(ValueError, match="nothing"):
        WeightedMean([torch.zeros(3)]).mean_()


# -- AdamW, LR schedules, averaging and DiLoCo's outer step --------------------------


@property_settings(25)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 64), steps=st.integers(1, 6),
       lr=st.floats(1e-4, 0.1), weight_decay=st.sampled_from([0.0, 0.01, 0.1]), into_update=st.booleans())
def test_adamw_rule_matches_torch_optim_adamw(seed, size, steps, lr, weight_decay, into_update):
    start, grads = random_problem(seed, size, steps)
    param = torch.nn.Parameter(start.clone())
    reference = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay, foreach=False)
    rule, state, weights = AdamWRule(lr=lr, weight_decay=weight_decay), {}, start.clone()
    for version, g in enumerate(grads):
        param.grad = g.clone()
        reference.step()
        before = weights.clone()
        update = g.clone()
        new = rule.apply(weights, update, state, version, out=update if into_update else None)
        assert torch.equal(weights, before)  # never written in place: pulls may be streaming it
        assert into_update == (new.data_ptr() == update.data_ptr())
        weights = new
    torch.testing.assert_close(weights, param.detach(), rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == steps


def test_lr_schedule_matches_torch_schedulers():
    """Warm-up then cosine equals LinearLR + CosineAnnealingLR chained by torch; step equals StepLR."""
    warmup, total, lr = 4, 20, 0.5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    cosine = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup),
    ], milestones=[warmup])
    ours = LRSchedule("cosine", warmup=warmup, total=total)
    for version in range(total):
        assert ours.factor(version) * lr == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), version
        opt.step()
        cosine.step()
    opt = torch.optim.SGD([param], lr=lr)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ours = LRSchedule("step", step_size=3, gamma=0.5)
    for version in range(12):
        assert ours.factor(version) * lr == pytest.approx(opt.param_groups[0]["lr"]), version
        opt.step()
        step.step()


def test_lr_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="cosine"):
        LRSchedule("cosine")
    with pytest.raises(ValueError, match="unknown"):
        LRSchedule("linear")


def test_sgd_rule_follows_its_schedule():
    rule = SGDRule(lr=1.0, schedule=LRSchedule("step", step_size=1, gamma=0.5))
    params = torch.zeros(3)
    params = rule.apply(params, torch.ones(3), {}, version=0)  # lr 1
    params = rule.apply(params, torch.ones(3), {}, version=1)  # lr 0.5
    torch.testing.assert_close(params, torch.full((3,), -1.5))


@property_settings(25)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 32), workers=st.integers(1, 4))
def test_plain_averaging_equals_the_mean_of_the_local_models(seed, size, workers):
    """Applying the sample-weighted mean delta gives the sample-weighted mean of the local weights."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=gen)
    local = [base + torch.randn(size, generator=gen) for _ in range(workers)]
    samples = [float(s) for s in torch.randint(1, 10, (workers,), generator=gen)]
    mean = WeightedMean([base])
    for w, n in zip(local, samples):
        mean.add(whole_regions([w - base]), n)
    update = mean.mean_()[0]
    result = AveragingRule("none").apply(base, update, {}, 0, out=update)
    assert result.data_ptr() == update.data_ptr()
    expected = sum(w * n for w, n in zip(local, samples)) / sum(samples)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@property_settings(25)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 32), rounds=st.integers(1, 5),
       outer_lr=st.floats(0.1, 1.0), outer_momentum=st.floats(0.0, 0.95), into_update=st.booleans())
def test_diloco_outer_step_is_nesterov_sgd_on_the_negated_delta(seed, size, rounds, outer_lr, outer_momentum,
                                                                into_update):
    """DiLoCo's outer optimizer: torch.optim.SGD(nesterov=True) fed the pseudo-gradient w_base - w_local."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(size, generator=gen))
    reference = torch.optim.SGD([param], lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
    rule = AveragingRule("nesterov", outer_lr=outer_lr, outer_momentum=outer_momentum)
    weights, state = param.detach().clone(), {}
    for version in range(rounds):
        delta = torch.randn(size, generator=gen)
        param.grad = -delta
        reference.step()
        weights = rule.apply(weights, delta, state, version, out=delta if into_update else None)
    torch.testing.assert_close(weights, param.detach(), rtol=1e-5, atol=1e-6)


def test_averaging_rule_rejects_an_unknown_outer_optimizer():
    with pytest.raises(ValueError, match="outer optimizer"):
        AveragingRule("adam")


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("into_update", [False, True])
def test_delayed_nesterov_over_a_round_equals_one_nesterov_step_on_the_sum(workers, into_update):
    """Async DiLoCo: k pushes of ~1/k of a round each move the weights as one sync outer step on their sum."""
    gen = torch.Generator().manual_seed(workers)
    rounds = 3
    deltas = [[0.1 * torch.randn(50, generator=gen) for _ in range(workers)] for _ in range(rounds)]
    start = torch.randn(50, generator=gen)

    # reference: torch.optim.SGD(nesterov) once per round on the pseudo-gradient -(sum of the round's deltas)
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    delayed, state = start.clone(), {}
    per_push, per_push_state = start.clone(), {}
    rule = AveragingRule("nesterov", outer_lr=0.7, outer_momentum=0.9, momentum_every=workers)
    wrong = AveragingRule("nesterov", outer_lr=0.7, outer_momentum=0.9)  # momentum on every push
    for r, round_deltas in enumerate(deltas):
        reference.grad = -torch.stack(round_deltas).sum(0)
        optimizer.step()
        for i, delta in enumerate(round_deltas):
            version = r * workers + i
            update = delta.clone()
            delayed = rule.apply(delayed, update, state, version, out=update if into_update else None)
            per_push = wrong.apply(per_push, delta.clone(), per_push_state, version)
        torch.testing.assert_close(delayed, reference.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per_push, reference.detach(), rtol=1e-3, atol=1e-4)  # the negative control


def test_delayed_nesterov_applies_each_push_when_it_arrives():
    rule = AveragingRule("nesterov", outer_lr=0.5, outer_momentum=0.9, momentum_every=4)
    params, delta = torch.zeros(3), torch.ones(3)
    after_one = rule.apply(params, delta.clone(), {}, 0)
    torch.testing.assert_close(after_one, 0.5 * delta)  # no momentum yet, but not held back either
    with pytest.raises(ValueError):
        AveragingRule("nesterov", momentum_every=0)


@pytest.mark.parametrize("momentum_every", [1, 2])
def test_outer_step_without_momentum_keeps_only_tensors_in_its_state(momentum_every):
    """--outer-momentum 0 is plain averaging scaled by the outer lr; its state must stay checkpointable."""
    rule = AveragingRule("nesterov", outer_lr=1.0, outer_momentum=0.0, momentum_every=momentum_every)
    state, params = {}, torch.zeros(4)
    for version in range(4):
        params = rule.apply(params, torch.ones(4), state, version)
    torch.testing.assert_close(params, torch.full((4,), 4.0))
    assert all(isinstance(t, torch.Tensor) for t in state.values())


def test_async_momentum_subtracts_the_implicit_momentum_of_asynchrony():
    from paramhub.ps.rules import async_momentum

    assert async_momentum(0.9, 1) == pytest.approx(0.9)  # one worker: nothing is stale
    assert async_momentum(0.9, 2) == pytest.approx(0.4)
    assert async_momentum(0.9, 4) == pytest.approx(0.15)
    assert async_momentum(0.9, 16) == 0.0  # never negative
