"""Helpers the benchmarks share: device sync, per-call timing, the bandwidth and matmul roofs, and writing a
result JSON so that a run cut short never leaves half a file.

On a GPU each timed call gets its own pair of CUDA events (device time) and the loop's host wall time is
kept too (launch overhead and host syncs show there); on a CPU both are perf_counter.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, iters: int) -> dict:
    """Median and min of per-call times in ms, and the mean host wall time per call, after `warmup` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        wall = time.perf_counter() - t0
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        t0 = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
    return {"ms_median": statistics.median(times), "ms_min": min(times), "wall_ms_mean": wall * 1e3 / iters}


def copy_bandwidth(device, dtype, nbytes: int, iters: int = 10) -> float:
    """Device memory bandwidth in GB/s from a big device-to-device copy (bytes read + bytes written)."""
    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    src = torch.ones(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    t = time_calls(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    del src, dst
    return 2 * nbytes / (t["ms_median"] * 1e-3) / 1e9


def matmul_tflops(device, dtype, n: int, iters: int = 10) -> float:
    """Dense matmul throughput in TFLOP/s from an n x n x n product (the compute roof)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_calls(lambda: a @ b, device, warmup=3, iters=iters)
    del a, b
    return 2 * n ** 3 / (t["ms_median"] * 1e-3) / 1e12


def write_json(path: str, doc: dict) -> None:
    """Write `doc` to `path` whole or not at all (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
