"""The sharding plan: which expert-parallel rank holds which expert, in which local slot.

This is the only code in epkit that maps experts to ranks. It touches no tensors: model
construction, checkpoint save and load, and the dispatchers all ask it.
"""
from __future__ import annotations

import json
import math

STRATEGIES = ("contiguous", "round_robin", "balanced")
EXPERT_SPLITS = ("experts", "rows")  # whole experts per rank by the plan, or a part of every expert's rows


def _even_sizes(num_experts: int, ep_size: int) -> list[int]:
    """How many experts each rank holds: as even as possible, the first ranks take the remainder."""
    base, extra = divmod(num_experts, ep_size)
    return [base + (1 if r < extra else 0) for r in range(ep_size)]


def _place(num_experts: int, ep_size: int, strategy: str, loads) -> list[int]:
    """owner[e] for one layer."""
    sizes = _even_sizes(num_experts, ep_size)
    if strategy == "contiguous":
        return [r for r, n in enumerate(sizes) for _ in range(n)]
    if strategy == "round_robin":
        return [e % ep_size for e in range(num_experts)]
    # balanced: longest-processing-time first, each rank keeping its even share of experts so memory
    # stays balanced too; ties go to the lower rank so the plan is deterministic.
    owner = [0] * num_experts
    load = [0.0] * ep_size
    room = list(sizes)
    for e in sorted(range(num_experts), key=lambda e: (-float(loads[e]), e)):
        r = min((r for r in range(ep_size) if room[r] > 0), key=lambda r: (load[r], r))
        owner[e] = r
        load[r] += float(loads[e])
        room[r] -= 1
    return owner


def _load_rows(loads, num_experts: int) -> list[list]:
    """`loads` (per expert, or per layer and expert) as rows of finite, non-negative numbers."""
    if loads is None:
        raise ValueError("strategy='balanced' needs loads=[tokens per expert] (or one list per layer)")
    if not isinstance(loads, (list, tuple)) or not loads:
        raise ValueError(f"loads={loads!r} must be a non-empty list of tokens per expert (or one list per layer)")
    rows = [list(r) if isinstance(r, (list, tuple)) else r for r in loads] \
        if isinstance(loads[0], (list, tuple)) else [list(loads)]
    for row in rows:
        if not isinstance(row, list):
            raise ValueError(f"loads mixes per-layer lists and numbers ({row!r})")
        if len(row) != num_experts:
            raise ValueError(f"loads has {len(row)} entries, expected one per expert ({num_experts})")
        bad = [x for x in row if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
               or x < 0]
        if bad:
            raise ValueError(f"loads entry {bad[0]!r} must be a finite number >= 0 (tokens routed to an expert)")
    return rows


class ShardingPlan:
    """expert -> (EP rank, local slot), per layer.

    ShardingPlan(8, 3) puts experts 0-2 on rank 0, 3-5 on rank 1, 6-7 on rank 2.
    `loads` (per expert, or per layer and expert) drives the `balanced` strategy; `owners` gives an
    explicit placement (one list of E ranks, or one per layer).
    """

    def __init__(self, num_experts: int, ep_size: int, strategy: str = "contiguous", loads=None,
                 num_layers: int | None = None, owners=None):
        for name, value in (("num_experts", num_experts), ("ep_size", ep_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer of at least 1")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                       or num_layers < 1):
            raise ValueError(f"num_layers={num_layers!r} must be None or an integer of at least 1")
        if ep_size > num_experts:
            raise ValueError(f"ep_size={ep_size} is larger than num_experts={num_experts}: every expert-parallel "
                             f"rank must hold at least one expert")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.num_experts, self.ep_size, self.strategy = num_experts, ep_size, strategy
        self.num_layers = num_layers
        if owners is not None:
            per_layer = [list(o) for o in owners] if owners and isinstance(owners[0], (list, tuple)) else None
            self._owners = per_layer or [list(owners)]
        elif strategy == "balanced":
            rows = _load_rows(loads, num_experts)
            self._owners = [_place(num_experts, ep_size, strategy, row) for row in rows]
        else:
            self._owners = [_place(num_experts, ep_size, strategy, None)]
        self._validate()
        # local slot of each expert: its rank among the experts its owner holds, by expert id
        self._slots = []
        for owner in self._owners:
            seen = [0] * ep_size
            slots = []
            for r in owner:
                slots.append(seen[r])
                seen[r] += 1
            self._slots.append(slots)

    def _validate(self) -> None:
        if len(self._owners) > 1 and self.num_layers is not None and len(self._owners) != self.num_layers:
            raise ValueError(f"the plan places {len(self._owners)} layers but the model has {self.num_layers}")
        for layer, owner in enumerate(self._owners):
            if len(owner) != self.num_experts:
                raise ValueError(f"layer {layer}: placement lists {len(owner)} experts, expected {self.num_experts}")
            bad = [r for r in owner if not (isinstance(r, int) and 0 <= r < self.ep_size)]
            if bad:
                raise ValueError(f"layer {layer}: owner rank {bad[0]!r} is outside 0..{self.ep_size - 1}")
            empty = [r for r in range(self.ep_size) if r not in owner]
            if empty:
                raise ValueError(f"layer {layer}: rank {empty[0]} holds no expert")

    @property
    def per_layer(self) -> bool:
        return len(self._owners) > 1

    def _layer(self, layer: int) -> int:
        if not self.per_layer:
            return 0
        if not 0 <= layer < len(self._owners):
            raise ValueError(f"layer={layer} is outside the plan's {len(self._owners)} layers")
        return layer

    def owner(self, expert: int, layer: int = 0) -> int:
        """The EP rank that holds `expert`."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert={expert} is outside 0..{self.num_experts - 1}")
        return self._owners[self._layer(layer)][expert]

    def slot(self, expert: int, layer: int = 0) -> int:
        """Where `expert` sits among its owner's local experts."""
        self.owner(expert, layer)
        return self._slots[self._layer(layer)][expert]

    def local_experts(self, rank: int, layer: int = 0) -> list[int]:
        """Global ids of the experts `rank` holds, in slot order."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank={rank} is outside 0..{self.ep_size - 1}")
        return [e for e, r in enumerate(self._owners[self._layer(layer)]) if r == rank]

    def owners(self, layer: int = 0) -> list[int]:
        return list(self._owners[self._layer(layer)])

    def slots(self, layer: int = 0) -> list[int]:
        return list(self._slots[self._layer(layer)])

    def rank_loads(self, expert_loads, layer: int = 0) -> list[float]:
        """Sum of per-expert loads (e.g. routed tokens) on each rank."""
        out = [0.0] * self.ep_size
        for e, r in enumerate(self._owners[self._layer(layer)]):
            out[r] += float(expert_loads[e])
        return out

    def check_matches(self, num_experts: int, num_layers: int | None = None, source: str = "plan") -> None:
        if self.num_experts != num_experts:
            raise ValueError(f"{source}: the plan names {self.num_experts} experts but config.json has {num_experts}")
        if self.per_layer and num_layers is not None and len(self._owners) != num_layers:
            raise ValueError(f"{source}: the plan places {len(self._owners)} layers but config.json has {num_layers}")

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "ep_size": self.ep_size, "strategy": self.strategy,
                "num_layers": self.num_layers,
                "owners": self._owners if self.per_layer else self._owners[0]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardingPlan":
        try:
            return cls(d["num_experts"], d["ep_size"], d.get("strategy", "contiguous"),
                       num_layers=d.get("num_layers"), owners=d["owners"])
        except KeyError as e:
            raise ValueError(f"sharding plan is missing the key {e}") from None

    @classmethod
    def from_manifest(cls, manifest, ep_size: int, strategy: str = "contiguous") -> "ShardingPlan":
        """A plan over `ep_size` ranks for the checkpoint a `checkpoint.Manifest` describes: its saved plan's
        experts and layers; `balanced` places them by the tokens per expert the manifest recorded. The only
        way a plan comes from a checkpoint."""
        source = manifest.file or "the checkpoint manifest"
        loads = None
        if strategy == "balanced":
            loads = manifest.routed_tokens
            if not loads:
                raise ValueError(f"strategy='balanced' needs routing counts and {source} has none; use 'contiguous'")
        if manifest.plan is None:
            raise ValueError(f"{source}: has no 'plan' entry")
        try:
            saved = cls.from_dict(manifest.plan)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None
        num_layers = saved.num_layers if saved.num_layers is not None else (len(loads) if loads else None)
        return cls(saved.num_experts, ep_size, strategy, loads=loads, num_layers=num_layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "ShardingPlan":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardingPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"ShardingPlan(num_experts={self.num_experts}, ep_size={self.ep_size}, strategy={self.strategy!r}, "
                f"sizes={[len(self.local_experts(r)) for r in range(self.ep_size)]})")
