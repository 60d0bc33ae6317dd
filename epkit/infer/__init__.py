"""Batched inference: `LLM` (engine) and its settings (`EngineConfig`), continuous-batching scheduler, paged
KV cache, sampling, and the lock-step runner that keeps expert-parallel ranks together. Imports no
training-only package; the OpenAI-compatible HTTP server (`epkit.infer.server`, FastAPI) is imported only
by whoever serves."""
from ..tokenizer import load_tokenizer
from .config import EngineConfig
from .llm import LLM
from .request import RequestOutput
from .kv_cache import BlockAllocator, PagedKVCache
from .sampling import SamplingParams
from .scheduler import Scheduler

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "PagedKVCache", "BlockAllocator", "Scheduler",
           "load_tokenizer"]
