"""Paged KV cache: fixed-size blocks handed out by an allocator, sized from a memory budget.

Every layer's keys and values live in one pool of `num_blocks * block_size` slots. A sequence owns a
list of blocks (its block table); token at position p sits in slot
`table[p // block_size] * block_size + p % block_size`. Block 0 is reserved as scratch: padding
tokens write there and unused table entries point there (their keys are masked out).

The cache implements the model's `KVCache` protocol. `prepare()` runs once per forward and computes
the write slots and the gather index for all layers, so each layer does one `index_copy_` and one
gather, with no host sync. A forward whose rows all start at position 0 (`fresh`: new prompts, not a
later chunk) reads nothing back: its keys are its own, and attention runs causal without a mask.

Legend: B batch rows, T new tokens per row, NB blocks per row, S = NB * block_size keys per row,
G KV heads, Dh head dim, L layers, P slots in the pool.
"""
from __future__ import annotations

import torch

from ..args import ModelArgs

SCRATCH_BLOCK = 0
CPU_KV_BUDGET = 256 << 20  # bytes of KV cache on CPU when no budget is given


class BlockAllocator:
    """A free list of block ids; block 0 is never handed out."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV cache needs at least 2 blocks (one is scratch)")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block of tokens."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * elt


def blocks_for_budget(args: ModelArgs, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    if budget_bytes <= 0:
        raise ValueError(f"KV cache budget {budget_bytes} bytes must be positive")
    n = int(budget_bytes // bytes_per_block(args, block_size, dtype))
    if n < 2:
        raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds {n} block(s) of {block_size} tokens; "
                         f"at least 2 are needed ({2 * bytes_per_block(args, block_size, dtype)} bytes)")
    return n


def profile_activations(model, device: torch.device, tokens: int) -> int:
    """Peak bytes a forward of `tokens` tokens (one prompt chunk) allocates on a GPU. Every EP rank must
    call it at once (the MoE all-reduces)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    n = min(tokens, model.args.max_position_embeddings)
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    with torch.no_grad():
        model(ids, logits_rows=torch.tensor([n - 1], device=device))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def size_prefill_chunk(model, device: torch.device, agree_min) -> int:
    """The default `max_num_batched_tokens`: 8192 on a GPU, halved (down to 512) while a step of that many
    tokens would need more than a quarter of the memory left after the weights; 2048 on CPU.
    `agree_min(int)` is the smallest value over the EP ranks, so that all of them profile the same sizes."""
    if device.type != "cuda":
        return 2048
    chunk = 8192
    free, _ = torch.cuda.mem_get_info(device)
    while chunk > 512 and not agree_min(int(profile_activations(model, device, chunk) <= free / 4)):
        chunk //= 2  # NOTE: a collective per size tried (agree_min)
    return chunk


def profile_kv_budget(model, device: torch.device, utilization: float, profile_tokens: int) -> int:
    """Bytes of KV cache a GPU can hold: `utilization` of the card, less what is in use and the
    activations of the largest forward a step can run (profiled here). On CPU, CPU_KV_BUDGET."""
    if device.type != "cuda":
        return CPU_KV_BUDGET
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={utilization} must be in (0, 1]")
    activations = profile_activations(model, device, profile_tokens)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(utilization * total - (total - free) - activations)
    if budget <= 0:
        raise RuntimeError(f"no GPU memory left for the KV cache: {utilization=} of {total >> 20} MiB, "
                           f"{(total - free) >> 20} MiB in use, {activations >> 20} MiB for activations")
    return budget


class PagedKVCache:
    """k, v pools [L, P, G, Dh]; implements `update(layer, k, v, positions)` for `epkit.model`."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, device, dtype: torch.dtype):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be positive")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.window = args.sliding_window
        self._step: CacheView | None = None  # what `prepare` set up for the next forward

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def prepare(self, block_table: torch.Tensor, positions: torch.Tensor, fresh: bool = False) -> None:
        """Set up the next forward's `update` calls: `view` of these rows."""
        self._step = self.view(block_table, positions, fresh)

    def view(self, block_table: torch.Tensor, positions: torch.Tensor, fresh: bool = False) -> "CacheView":
        """One forward's slots: block_table [B, NB] int64, positions [B, T] (-1 padding), both on the cache's
        device. Several views can be live at once (the forwards of one step, `Mixtral.forward_segments`).

        Rows hold contiguous positions 0..n-1 overall, so after this step a row's keys are the slots
        0..max(positions) of its table, in order. `fresh` (the caller knows every row starts at position 0,
        padded at the end): `update` then returns this forward's own keys and no positions, for causal
        attention, unless a sliding window shorter than the rows needs the mask.
        """
        fresh = fresh and (self.window is None or positions.shape[1] <= self.window)
        bs = self.block_size
        B, NB = block_table.shape
        write = self.write_slots(block_table, positions).reshape(-1)  # [B*T]
        if fresh:  # update() reads nothing back
            return CacheView(self, write, None, None)
        s = torch.arange(NB * bs, device=positions.device)  # [S]
        read = block_table[:, s // bs] * bs + s % bs  # [B, S]
        length = positions.amax(dim=1, keepdim=True) + 1  # [B, 1] keys held after this step
        return CacheView(self, write, read, torch.where(s[None, :] < length, s[None, :], -1))

    def write_slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pool slot of each token [B, T]; padding (position -1) goes to the scratch block."""
        bs = self.block_size
        pos = positions.clamp(min=0)
        slot = block_table.gather(1, pos // bs) * bs + pos % bs
        return torch.where(positions >= 0, slot, SCRATCH_BLOCK * bs)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """`CacheView.update` of the forward `prepare` set up."""
        if self._step is None:
            raise RuntimeError("PagedKVCache.update called before prepare() for this step")
        return self._step.update(layer, k, v, positions)

    def attention_mask(self, positions: torch.Tensor, window: int | None) -> torch.Tensor:
        """`CacheView.attention_mask` of the forward `prepare` set up."""
        return self._step.attention_mask(positions, window)


class CacheView:
    """The slots one forward writes (write [B*T]) and reads back (read [B, S] with key positions [B, S]; None
    after a fresh view: the keys are the forward's own) in a `PagedKVCache`; implements `epkit.model.KVCache`."""

    def __init__(self, cache: PagedKVCache, write: torch.Tensor, read: torch.Tensor | None,
                 key_pos: torch.Tensor | None):
        self.cache, self._write, self._read, self._key_pos = cache, write, read, key_pos
        self._mask = None

    def attention_mask(self, positions: torch.Tensor, window: int | None) -> torch.Tensor:
        """`epkit.model.attention_mask` of these rows against their keys, built at the first layer and kept for
        the others (every layer's queries and keys sit at the same positions)."""
        if self._mask is None:
            from ..model import attention_mask
            self._mask = attention_mask(positions, self._key_pos, window)
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v [B, G, T, Dh] -> all keys/values of each row [B, G, S, Dh] and key positions [B, S]; after a
        fresh view, k and v themselves and None (attention is causal)."""
        B, G, T, Dh = k.shape
        self.cache.k[layer].index_copy_(0, self._write, k.transpose(1, 2).reshape(B * T, G, Dh))
        self.cache.v[layer].index_copy_(0, self._write, v.transpose(1, 2).reshape(B * T, G, Dh))
        if self._read is None:  # the keys are this forward's own, from position 0: causal, nothing to read back
            return k, v, None
        k_all = self.cache.k[layer][self._read].transpose(1, 2)  # [B, G, S, Dh]
        v_all = self.cache.v[layer][self._read].transpose(1, 2)
        return k_all, v_all, self._key_pos
