"""Batched inference: `LLM` (engine), continuous-batching scheduler, paged KV cache, sampling, and the
lock-step runner that keeps expert-parallel ranks together. Imports no training-only package; the
OpenAI-compatible HTTP server (`epkit.infer.server`, FastAPI) is imported only by whoever serves."""
from .engine import LLM, load_tokenizer
from .request import RequestOutput
from .kv_cache import BlockAllocator, PagedKVCache
from .sampling import SamplingParams
from .scheduler import Scheduler

__all__ = ["LLM", "RequestOutput", "SamplingParams", "PagedKVCache", "BlockAllocator", "Scheduler", "load_tokenizer"]
