"""Per-request sampling: greedy, temperature, top-k, top-p, seed; stop tokens and strings; max tokens.

`sample()` works on the whole batch at once: one set of tensor ops for every row, whatever mix of
greedy and random rows it holds. Random rows draw from a counter-based hash keyed by
(request seed, output index, vocab id), not from a shared generator, so a seeded request gives the
same tokens whatever else is in the batch, after a preemption, and at any EP size.

Legend: R rows to sample, V vocab.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2^27, so products of 32-bit values stay inside int64
# Temperatures below this decode greedily: logits / 1e-40 overflow to inf and the softmax to NaN (token 0).
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    """How one request is decoded. Defaults follow vLLM: temperature 1 (sampling), 16 new tokens.

    temperature 0 (or below 1e-5) is greedy. top_k 0 or -1 and top_p 1 switch those filters off. `seed` makes a sampled
    request reproducible. `stop` strings end the text (not included in it); `stop_token_ids` and the
    model's EOS (unless `ignore_eos`) end generation with the stop token kept in `token_ids`.
    `logprobs` (None: off) returns each chosen token's log-probability under the model's distribution
    (before temperature, top-k and top-p) and that many most likely alternatives with theirs.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError with one sentence naming the bad value."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        if (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                or not (0 < self.top_p <= 1)):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= -1 (0 or -1 switch it off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        if self.stop is not None:
            if not isinstance(self.stop, (str, list, tuple)) or any(not isinstance(s, str) or not s
                                                                   for s in self.stop_strings):
                raise ValueError(f"stop={self.stop!r} must be a non-empty string or a list of them")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs={self.logprobs!r} must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"stop token id {t!r} is outside the vocabulary (size {vocab_size})")

    def choices(self, n: int) -> list["SamplingParams"]:
        """Settings of `n` completions of one prompt (OpenAI's `n`): a seeded request's choice i uses
        seed + i (choice 0 is the request itself); unseeded choices each get their own random seed."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive integer")
        if self.seed is None:
            return [self] * n
        return [dataclasses.replace(self, seed=self.seed + i) for i in range(n)]

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a JSON request's optional fields; unknown fields are an error."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


# ---- counter-based random numbers ------------------------------------------------------------

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensor of values in [0, 2^32))."""
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    x = (((x >> 16) ^ x) * _HASH_MUL) & _M32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, counters [R] int64 -> u [R, V] float64 in (0, 1), a pure function of (seed, counter, vocab id)."""
    h = _mix32(seeds & _M32)
    h = _mix32(h ^ ((seeds >> 32) & _M32))
    h = _mix32((h + counters * 0x9E3779B) & _M32)  # [R]
    v = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    u = _mix32(_mix32((h[:, None] + v * 0x27D4EB) & _M32) ^ h[:, None])  # [R, V]
    return (u.double() + 0.5) / 4294967296.0


# ---- batched sampling ------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float; top_k [R] (V = off); top_p [R] -> logits with filtered entries at -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (at least one).
    """
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [R, V]
    rank = torch.arange(V, device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly above each token
    drop |= before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


@dataclass
class SamplingBatch:
    """Per-row settings for one `sample()` call, built on the host from each request's params."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seeds: list[int]
    counters: list[int]  # index of the token being drawn within its request's output

    @classmethod
    def from_params(cls, params: list[SamplingParams], seeds: list[int], counters: list[int], vocab: int):
        return cls([p.temperature for p in params], [p.top_k if p.top_k > 0 else vocab for p in params],
                   [float(p.top_p) for p in params], seeds, counters)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor on `device` without waiting for the device: through pinned
    memory and an asynchronous copy (a plain copy from pageable memory first waits for every queued kernel)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host: the copy is queued now, `get()` waits for it (and only it)
    and returns it as a list."""

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = t.clone(), None

    def get(self) -> list:
        if self.done is not None:
            self.done.synchronize()  # NOTE: host sync, on this copy only (later work stays queued)
        return self.host.tolist()


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [R, V] -> next token ids [R] (int64, on logits' device). No host sync inside."""
    R, V = logits.shape
    logits = logits.float()
    greedy_tokens = torch.argmax(logits, dim=-1)
    if all(t < GREEDY_BELOW for t in batch.temperature):
        return greedy_tokens
    dev = logits.device
    temp = to_device([t if t >= GREEDY_BELOW else 1.0 for t in batch.temperature], torch.float32, dev)
    scaled = logits / temp[:, None]
    if any(k < V for k in batch.top_k) or any(p < 1 for p in batch.top_p):
        scaled = filter_logits(scaled, to_device(batch.top_k, torch.int64, dev),
                               to_device(batch.top_p, torch.float32, dev))
    probs = torch.softmax(scaled, dim=-1)
    seeds = to_device([s % (1 << 63) for s in batch.seeds], torch.int64, dev)
    u = uniform_noise(seeds, to_device(batch.counters, torch.int64, dev), V)
    # Exponential race (Gumbel-max): argmax p_i / E_i with E_i ~ Exp(1) is a draw from p.
    drawn = torch.argmax(probs.double() / -torch.log(u), dim=-1)
    is_greedy = to_device([t < GREEDY_BELOW for t in batch.temperature], torch.bool, dev)
    return torch.where(is_greedy, greedy_tokens, drawn)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """logits [R, V], chosen [R] -> the chosen tokens' log-probabilities [R] and the k most likely
    tokens [R, k] with theirs [R, k], under the model's distribution. No host sync inside."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1)
    if k == 0:
        return chosen_logp, chosen[:, None][:, :0], logp[:, :0]
    top_logp, top_ids = torch.topk(logp, k, dim=-1)
    return chosen_logp, top_ids, top_logp
