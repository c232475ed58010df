import pytest
import torch

from conftest import USER_MODEL
from sosp_engine.errors import AnalysisError
from sosp_engine.nets import build_model
from sosp_engine.saliency.selection import (
    Budget,
    greedy_order,
    literal_greedy_order,
    order_by_saliency,
    prefix_for_target,
)
from sosp_engine.pruning.offered import find_structures


@pytest.fixture(scope="module")
def resnet():
    return find_structures(build_model("resnet20"), torch.randn(1, 3, 32, 32), preset="cifar-resnet")


@pytest.fixture(scope="module")
def mixed():
    return find_structures(build_model(USER_MODEL), torch.randn(1, 3, 8, 8))


def random_q(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (a @ a.T).abs() / n


@pytest.mark.parametrize("cap", [0.95, 0.5])
@pytest.mark.parametrize("normalize", ["none", "kernel", "macs"])
def test_fast_greedy_equals_literal_eq4(resnet, cap, normalize):
    q = random_q(resnet.num_structures)
    fast, n_fast = greedy_order(q, resnet, cap, normalize)
    slow, n_slow = literal_greedy_order(q, resnet, cap, normalize)
    assert n_fast == n_slow and torch.equal(fast, slow)


def test_greedy_with_correlations_differs_from_sorting_the_diagonal(resnet):
    q = random_q(resnet.num_structures, seed=3)
    greedy, _ = greedy_order(q, resnet, 0.95)
    by_diagonal, _ = order_by_saliency(q.diagonal(), resnet, 0.95)
    assert not torch.equal(greedy, by_diagonal)


def test_order_is_a_permutation_of_all_structures(resnet):
    order, n = order_by_saliency(torch.rand(resnet.num_structures, dtype=torch.float64), resnet, 0.95)
    assert sorted(order.tolist()) == list(range(resnet.num_structures)) and n < resnet.num_structures


@pytest.mark.parametrize("structures_name", ["resnet", "mixed"])
@pytest.mark.parametrize("cap", [0.95, 0.6])
def test_caps_and_floors_hold_at_every_prefix(request, structures_name, cap):
    structures = request.getfixturevalue(structures_name)
    q = random_q(structures.num_structures, seed=5)
    for order, n in (greedy_order(q, structures, cap), order_by_saliency(q.diagonal(), structures, cap)):
        pruned_per_layer = torch.zeros(len(structures.layers), dtype=torch.long)
        pruned = torch.zeros(structures.num_structures, dtype=torch.bool)
        caps = [min(int(cap * l.size + 1e-9), l.size - 1) for l in structures.layers]
        for s in order[:n].tolist():
            pruned[s] = True
            pruned_per_layer[structures.layer_of[s]] += 1
            assert all(int(p) <= c for p, c in zip(pruned_per_layer, caps))
            assert not structures.emptied_producers(pruned)
        assert pruned_per_layer.tolist() == caps or structures_name == "mixed"


def test_budget_blocks_a_layer_once_its_cap_is_reached(resnet):
    budget = Budget(resnet, 0.25)
    members = [s for s, g in enumerate(resnet.layer_of.tolist()) if g == 1]
    for s in members[:4]:
        budget.take(s)
    assert all(budget.blocked[s] for s in members)


@pytest.mark.parametrize("unit", ["params", "macs"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_targets_land_on_the_requested_value(resnet, unit, ratio):
    order, n = order_by_saliency(torch.rand(resnet.num_structures, dtype=torch.float64), resnet, 0.95)
    k = prefix_for_target(order, n, resnet, ratio, unit)
    column = 0 if unit == "params" else 1
    total = resnet.counts()[column]

    def reduction(count):
        pruned = torch.zeros(resnet.num_structures, dtype=torch.bool)
        pruned[order[:count]] = True
        return 1 - resnet.counts(pruned)[column] / total

    assert reduction(k) >= ratio > reduction(k - 1)


def test_structure_targets_round_up_to_whole_structures(resnet):
    order, n = order_by_saliency(torch.rand(resnet.num_structures, dtype=torch.float64), resnet, 0.95)
    assert prefix_for_target(order, n, resnet, 0.5) == resnet.num_structures // 2


def test_impossible_ratio_is_a_clear_error(resnet):
    order, n = order_by_saliency(torch.rand(resnet.num_structures, dtype=torch.float64), resnet, 0.5)
    with pytest.raises(AnalysisError, match="impossible with this cap"):
        prefix_for_target(order, n, resnet, 0.7)
    with pytest.raises(AnalysisError, match="impossible with this cap"):
        prefix_for_target(order, n, resnet, 0.9, "params")


def kept_widths(structures, order, count):
    pruned = torch.zeros(structures.num_structures, dtype=torch.bool)
    pruned[order[:count]] = True
    return [l.size - int(pruned[structures.layer_of == g].sum()) for g, l in enumerate(structures.layers)]


@pytest.mark.parametrize("round_to", [4, 8])
def test_every_stop_of_a_rounded_order_keeps_widths_in_multiples(resnet, round_to):
    from sosp_engine.pruning.rounding import rounded_order, rounded_stops

    order, n = order_by_saliency(
        torch.rand(resnet.num_structures, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        resnet,
        0.95,
    )
    rounded, n_rounded = rounded_order(order, n, resnet, round_to)
    stops = rounded_stops(rounded, n_rounded, resnet, round_to)
    assert sorted(rounded.tolist()) == list(range(resnet.num_structures)) and stops[-1] == n_rounded
    for stop in stops:
        assert all(w % round_to == 0 and w >= round_to for w in kept_widths(resnet, rounded, stop))


def test_a_rounded_target_is_met_at_the_next_stop(resnet):
    from sosp_engine.pruning.rounding import rounded_order, rounded_stops

    order, n = order_by_saliency(
        torch.rand(resnet.num_structures, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
        resnet,
        0.95,
    )
    rounded, n_rounded = rounded_order(order, n, resnet, 8)
    stops = rounded_stops(rounded, n_rounded, resnet, 8)
    for unit in ("structures", "params", "macs"):
        k = prefix_for_target(rounded, n_rounded, resnet, 0.4, unit, stops)
        assert k in stops and k >= prefix_for_target(rounded, n_rounded, resnet, 0.4, unit)


def test_objective_prefix_of_the_greedy_order_is_the_sum_of_its_increments(resnet):
    from sosp_engine.saliency.selection import objective_prefix

    q = random_q(resnet.num_structures, seed=3)
    increments: list[float] = []
    order, n = greedy_order(q, resnet, 0.95, "none", increments)
    prefix = objective_prefix(q, order, n)
    torch.testing.assert_close(prefix[1:], torch.tensor(increments, dtype=torch.float64).cumsum(0))
    mask = order[:10]
    assert prefix[10].item() == pytest.approx(q[mask][:, mask].sum().item())
