"""The sharding planner: placements, uneven splits, balancing, JSON, validation."""
import pytest

from epkit import ShardingPlan


def test_contiguous_and_uneven():
    plan = ShardingPlan(8, 3)
    assert [plan.local_experts(r) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [plan.owner(e) for e in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [plan.slot(e) for e in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert ShardingPlan(8, 1).local_experts(0) == list(range(8))
    assert [len(ShardingPlan(8, 8).local_experts(r)) for r in range(8)] == [1] * 8


def test_round_robin():
    plan = ShardingPlan(8, 3, strategy="round_robin")
    assert [plan.local_experts(r) for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert plan.slot(7) == 2 and plan.slot(5) == 1


def test_balanced_minimises_the_most_loaded_rank():
    loads = [100, 90, 5, 5, 80, 10, 10, 20]
    balanced = ShardingPlan(8, 2, strategy="balanced", loads=loads)
    contiguous = ShardingPlan(8, 2)
    assert max(balanced.rank_loads(loads)) < max(contiguous.rank_loads(loads))
    import itertools  # brute force over every 4/4 split: the greedy placement reaches the optimum here
    best = min(max(sum(loads[e] for e in c), sum(loads) - sum(loads[e] for e in c))
               for c in itertools.combinations(range(8), 4))
    assert max(balanced.rank_loads(loads)) == best == 180
    assert sorted(len(balanced.local_experts(r)) for r in range(2)) == [4, 4]  # memory stays even


def test_per_layer_placement_and_json_round_trip():
    loads = [[1, 2, 3, 4, 5, 6, 7, 8], [50, 40, 1, 1, 1, 1, 1, 1]]
    plan = ShardingPlan(8, 2, strategy="balanced", loads=loads, num_layers=2)
    assert plan.per_layer and plan.owners(0) != plan.owners(1)
    assert plan.owner(0, layer=1) != plan.owner(1, layer=1)  # the two hot experts of layer 1 are split
    again = ShardingPlan.from_json(plan.to_json())
    assert again == plan and again.local_experts(1, layer=1) == plan.local_experts(1, layer=1)
    explicit = ShardingPlan(4, 2, owners=[1, 0, 1, 0])
    assert explicit.local_experts(1) == [0, 2] and explicit.slot(2) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=8, ep_size=0), "ep_size=0 must be an integer of at least 1"),
    (dict(num_experts=8, ep_size=9), "ep_size=9 is larger than num_experts=8"),
    (dict(num_experts=8, ep_size=2, strategy="random"), "unknown placement strategy 'random'"),
    (dict(num_experts=8, ep_size=2, strategy="balanced"), "strategy='balanced' needs loads"),
    (dict(num_experts=8, ep_size=2, strategy="balanced", loads=[1, 2]), "loads has 2 entries, expected one per expert"),
    (dict(num_experts=8.0, ep_size=2), "num_experts=8.0 must be an integer of at least 1"),
    (dict(num_experts="8", ep_size=2), "num_experts='8' must be an integer of at least 1"),
    (dict(num_experts=8, ep_size=2, num_layers=0), "num_layers=0 must be None or an integer"),
    (dict(num_experts=8, ep_size=2, strategy="balanced", loads=[]), "loads=\\[\\] must be a non-empty list"),
    (dict(num_experts=4, ep_size=2, strategy="balanced", loads=[1, -2, 3, 4]), "loads entry -2 must be a finite"),
    (dict(num_experts=4, ep_size=2, strategy="balanced", loads=[1, float("nan"), 3, 4]), "loads entry nan must"),
    (dict(num_experts=4, ep_size=2, strategy="balanced", loads=[[1, 2, 3, 4], 5]), "loads mixes per-layer lists"),
    (dict(num_experts=4, ep_size=2, owners=[0, 0, 0, 0]), "layer 0: rank 1 holds no expert"),
    (dict(num_experts=4, ep_size=2, owners=[0, 1, 2, 0]), "owner rank 2 is outside 0..1"),
])
def test_invalid_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardingPlan(**kwargs)


def test_manifest_disagreeing_with_checkpoint():
    with pytest.raises(ValueError, match="ckpt/epkit_plan.json: the plan names 8 experts but config.json has 6"):
        ShardingPlan(8, 2).check_matches(6, source="ckpt/epkit_plan.json")
    with pytest.raises(ValueError, match="expert=8 is outside 0..7"):
        ShardingPlan(8, 2).owner(8)
