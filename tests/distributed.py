"""Run a test body on N real processes joined by gloo (CPU), the way every multi-rank test does.

`run(fn, world, *args)` spawns `world` processes; each calls fn(rank, world, *args). A failure on any
rank fails the test with that rank's traceback. Results come back through a queue, in rank order.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
        if dist.is_initialized():  # fn may have closed it (runtime.run_entry does after a success)
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def run(fn, world: int, *args, timeout: float = 300):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as q
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = out
            else:
                errors.append(f"rank {rank}:\n{out}")
                break
    except q.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks")
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
