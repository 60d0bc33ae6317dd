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


def test_layer_defaults_and_bounds():
    """Without `layer`, a per-layer plan answers for layer 0; layers and ranks outside the plan are errors."""
    plan = ShardingPlan(4, 2, owners=[[0, 0, 1, 1], [1, 0, 1, 0]], num_layers=2)
    assert plan.owners() == plan.owners(0) != plan.owners(1)
    assert [plan.owner(e) for e in range(4)] == plan.owners(0) and plan.slots() == plan.slots(0) != plan.slots(1)
    assert [plan.slot(e) for e in range(4)] == plan.slots(0)
    assert plan.local_experts(0) == plan.local_experts(0, layer=0) != plan.local_experts(0, layer=1)
    assert plan.rank_loads([1, 2, 3, 4]) == plan.rank_loads([1, 2, 3, 4], layer=0) == [3.0, 7.0]
    assert plan.rank_loads([1, 2, 3, 4], layer=1) == [6.0, 4.0] and plan.local_experts(0, layer=1) == [1, 3]
    for bad in (2, -1):
        with pytest.raises(ValueError, match=rf"layer={bad} is outside the plan's 2 layers"):
            plan.owners(bad)
        with pytest.raises(ValueError, match=rf"layer={bad} is outside the plan's 2 layers"):
            plan.slot(0, layer=bad)
    for bad in (2, -1):
        with pytest.raises(ValueError, match=rf"rank={bad} is outside 0\.\.1"):
            plan.local_experts(bad)
    one = ShardingPlan(4, 2)  # one placement for every layer
    assert one.owners(5) == one.owners(0) == [0, 0, 1, 1] and not one.per_layer


def test_sizes_layers_and_messages():
    assert ShardingPlan(1, 1).owners() == [0] and ShardingPlan(2, 2).local_experts(1) == [1]
    with pytest.raises(ValueError, match="num_experts=0 must be an integer of at least 1"):
        ShardingPlan(0, 1)
    with pytest.raises(ValueError, match="unknown placement strategy 'x'; choose one of contiguous, round_robin, "
                                         "balanced"):
        ShardingPlan(4, 2, strategy="x")
    with pytest.raises(ValueError, match=r"the plan places 2 layers but the model has 3"):
        ShardingPlan(4, 2, strategy="balanced", loads=[[1, 2, 3, 4], [4, 3, 2, 1]], num_layers=3)
    assert ShardingPlan(4, 2, num_layers=3).num_layers == 3  # one placement serves any number of layers
    with pytest.raises(ValueError, match=r"layer 0: placement lists 3 experts, expected 4"):
        ShardingPlan(4, 2, owners=[0, 1, 0])
    with pytest.raises(ValueError, match=r"layer 1: owner rank -1 is outside 0\.\.1"):
        ShardingPlan(4, 2, owners=[[0, 1, 0, 1], [0, 1, -1, 1]])
    per_layer = ShardingPlan(4, 2, owners=[[0, 1, 0, 1], [1, 1, 0, 0]], num_layers=2)
    with pytest.raises(ValueError, match=r"^plan: the plan places 2 layers but config\.json has 3$"):
        per_layer.check_matches(4, 3)
    per_layer.check_matches(4, 2)
    per_layer.check_matches(4)
    ShardingPlan(4, 2).check_matches(4, 3)  # a single placement fits any layer count
    assert repr(per_layer) == "ShardingPlan(num_experts=4, ep_size=2, strategy='contiguous', sizes=[2, 2])"


def test_dict_round_trip_and_equality():
    flat = ShardingPlan(4, 2, strategy="round_robin", num_layers=3)
    assert flat.to_dict() == {"num_experts": 4, "ep_size": 2, "strategy": "round_robin", "num_layers": 3,
                              "owners": [0, 1, 0, 1]}
    per_layer = ShardingPlan(4, 2, owners=[[0, 1, 0, 1], [1, 1, 0, 0]], num_layers=2)
    assert per_layer.to_dict()["owners"] == [[0, 1, 0, 1], [1, 1, 0, 0]]
    assert ShardingPlan.from_dict(per_layer.to_dict()) == per_layer
    bare = ShardingPlan.from_dict({"num_experts": 4, "ep_size": 2, "owners": [0, 0, 1, 1]})
    assert bare.strategy == "contiguous" and bare.num_layers is None and bare == ShardingPlan(4, 2)
    with pytest.raises(ValueError, match="sharding plan is missing the key 'owners'"):
        ShardingPlan.from_dict({"num_experts": 4, "ep_size": 2})
    assert ShardingPlan(4, 2) != ShardingPlan(4, 2, strategy="round_robin") and ShardingPlan(4, 2) != "plan"
    assert ShardingPlan(4, 2).to_dict() != {"owners": [0, 0, 1, 1]}


def test_from_manifest():
    """The only way a plan comes from a checkpoint: its saved plan's experts and layers, re-placed for any EP
    size; `balanced` by the routing counts the manifest recorded."""
    from epkit.checkpoint import Manifest
    saved = ShardingPlan(8, 2, num_layers=2).to_dict()
    loads = [[5, 1, 1, 1, 9, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 20]]
    m = Manifest(plan=saved, routed_tokens=loads, file="ck/epkit_plan.json")
    assert ShardingPlan.from_manifest(m, 4) == ShardingPlan(8, 4, num_layers=2)
    assert ShardingPlan.from_manifest(m, 4, "round_robin") == ShardingPlan(8, 4, "round_robin", num_layers=2)
    balanced = ShardingPlan.from_manifest(m, 4, "balanced")
    assert balanced == ShardingPlan(8, 4, "balanced", loads=loads, num_layers=2) and balanced.per_layer
    # a saved plan without a layer count takes it from the recorded loads
    bare = Manifest(plan={k: v for k, v in saved.items() if k != "num_layers"}, routed_tokens=loads)
    assert ShardingPlan.from_manifest(bare, 2, "balanced").num_layers == 2
    assert ShardingPlan.from_manifest(bare, 2).num_layers is None
    for manifest, strategy, message in [
            (Manifest(plan=saved, file="ck/epkit_plan.json"), "balanced",
             "^strategy='balanced' needs routing counts and ck/epkit_plan.json has none; use 'contiguous'$"),
            (Manifest(plan=saved, routed_tokens=[]), "balanced", "needs routing counts and the checkpoint manifest has none"),
            (Manifest(routed_tokens=loads, file="ck/p.json"), "contiguous", "^ck/p.json: has no 'plan' entry$"),
            (Manifest(plan={"num_experts": 8, "ep_size": 2}, file="ck/p.json"), "contiguous",
             "^ck/p.json: sharding plan is missing the key 'owners'$"),
            (Manifest(plan={**saved, "owners": [0, 0, 0, 0, 0, 0, 0, 0]}, file="ck/p.json"), "contiguous",
             "^ck/p.json: layer 0: rank 1 holds no expert$")]:
        with pytest.raises(ValueError, match=message):
            ShardingPlan.from_manifest(manifest, 2, strategy)


@pytest.mark.parametrize("loads, message", [
    (None, r"^strategy='balanced' needs loads=\[tokens per expert\] \(or one list per layer\)$"),
    ([], r"^loads=\[\] must be a non-empty list of tokens per expert"),
    ("1234", r"^loads='1234' must be a non-empty list"),
    ([[1, 2, 3, 4], 5], r"^loads mixes per-layer lists and numbers \(5\)$"),
    ([1, 2, -1, 4], r"^loads entry -1 must be a finite number >= 0"),
    ([1, 2, float("nan"), 4], r"^loads entry nan must be a finite number >= 0"),
    ([1, 2, True, 4], r"^loads entry True must be a finite number >= 0"),
    ([1, 2, "3", 4], r"^loads entry '3' must be a finite number >= 0"),
    ([[1, 2, 3, 4], [1, 2, 3]], r"^loads has 3 entries, expected one per expert \(4\)$"),
])
def test_bad_loads(loads, message):
    with pytest.raises(ValueError, match=message):
        ShardingPlan(4, 2, "balanced", loads=loads)


def test_loads_and_layer_counts_that_are_fine():
    """Zero and fractional loads are loads; tuples count as lists; one layer is a layer count."""
    assert ShardingPlan(4, 2, "balanced", loads=[0, 0.5, 0, 3]).owners() == [1, 1, 0, 0]  # rank 0: 3 + 0, rank 1: 0.5 + 0
    tuples = ShardingPlan(4, 2, "balanced", loads=[(1, 2, 3, 4), (4, 3, 2, 1)], num_layers=2)
    assert tuples == ShardingPlan(4, 2, "balanced", loads=[[1, 2, 3, 4], [4, 3, 2, 1]], num_layers=2)
    assert ShardingPlan(4, 2, num_layers=1).num_layers == 1
    for bad in (0, True, 1.0, "2"):
        with pytest.raises(ValueError, match=f"^num_layers={bad!r} must be None or an integer of at least 1$"):
            ShardingPlan(4, 2, num_layers=bad)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=f"^ep_size={bad!r} must be an integer of at least 1$"):
            ShardingPlan(4, bad)
