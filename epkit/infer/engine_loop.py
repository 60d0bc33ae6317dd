"""The engine behind the HTTP server: rank 0's engine thread, and the other ranks' follower loop.

    loop = EngineLoop(llm, capacity=llm.scheduler.max_num_seqs + max_queue); loop.start()
    sub = Submission("cmpl-1", prompts, [params], n=2, events=asyncio.Queue(), loop=asyncio_loop)
    loop.submit(sub)         # then read sub.events: ("admitted",) or ("error", status, message), then
                             # ("update", Delta) per choice and token, until every choice finished
    loop.abort(sub.id)       # a client went away: its KV blocks return to the pool before the next step

One thread owns the `LLM` and alone calls add_request / abort / step, so the engine needs no lock.
Handlers (the asyncio loop) hand it work through a thread-safe inbox; updates go back to each
request's asyncio.Queue with `call_soon_threadsafe`. The thread steps while anything is pending.
Idle, it pings the other EP ranks every `ping_s`, which keeps them inside the collective timeout and
finds a dead rank within seconds.

A step or ping that raises, or that runs longer than `step_timeout_s` (a rank that stopped answering
leaves the others inside a collective, which would never return), marks the engine dead: every request
gets a 503 and `on_dead` tells the server to exit non-zero.

Other ranks call `follow_leader(llm, timeout_s)`: they run the leader's steps until it releases them
(exit 0), and exit non-zero if the leader dies or goes silent for `timeout_s`.
"""
from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class Submission:
    """One HTTP request: its prompts (text, token ids or {"messages": ...}), their settings and n choices
    each; choice `i * n + j` is prompt i's j-th completion."""

    id: str
    prompts: list
    params: list[SamplingParams]
    n: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Delta:
    """What one choice gained in one step (or its end)."""

    index: int
    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None  # chosen tokens'
    top_logprobs: list[list[tuple[int, float]]] | None
    tokens: list[str] | None  # the new tokens as text (for logprobs), None unless asked
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class EngineLoop:
    def __init__(self, llm, capacity: int, ping_s: float = 2.0, step_timeout_s: float = 30.0,
                 on_dead=None, observe_ttft=None, observe_itl=None, on_finish=None):
        self.llm, self.capacity = llm, capacity
        self.ping_s, self.step_timeout_s = ping_s, step_timeout_s
        self.on_dead, self.on_finish = on_dead, on_finish
        self.observe_ttft, self.observe_itl = observe_ttft, observe_itl
        self.dead: str | None = None
        self.in_flight = 0  # choices admitted and not finished (asyncio thread only)
        self._inbox: queue.Queue = queue.Queue()
        self._subs: dict[str, tuple[Submission, list[str]]] = {}  # engine thread only
        self._route: dict[str, tuple[Submission, int]] = {}  # engine request id -> (submission, choice)
        self._last_token: dict[str, float] = {}
        self._busy_since: float | None = None
        # Fault injection for tests (a slow engine): seconds to sleep after every step. 0 in real use.
        self._step_delay_s = float(os.environ.get("EPKIT_FAULT_STEP_DELAY_S", 0))
        self._routed_at = 0.0
        self.snapshot = {**llm.occupancy(), "generated_tokens": 0, "prompt_tokens": 0, "routed": None}
        self._thread = threading.Thread(target=self._run, name="epkit-engine", daemon=True)

    # ---- asyncio side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._watchdog, name="epkit-watchdog", daemon=True).start()

    def reserve(self, size: int) -> bool:
        """Room for `size` more choices (asyncio thread); False: the queue is full (429)."""
        if self.in_flight + size > self.capacity:
            return False
        self.in_flight += size
        return True

    def release(self, size: int) -> None:
        self.in_flight -= size

    def submit(self, sub: Submission) -> None:
        self._inbox.put(("submit", sub))
        if self.dead is not None:  # died meanwhile: nobody will take it
            self._fail_inbox()

    def abort(self, sub_id: str) -> None:
        self._inbox.put(("abort", sub_id))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None))

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the thread (after what is in the inbox) and release the other ranks."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.llm.device.type == "cuda":  # the current device is per thread
            import torch
            torch.cuda.set_device(self.llm.device)
        last_collective, stopping = time.monotonic(), False
        try:
            while True:
                block = not self.llm.has_unfinished() and not stopping
                while True:  # every command waiting; wait for one only when idle
                    try:
                        cmd, arg = self._inbox.get(block=block, timeout=self.ping_s if block else None)
                    except queue.Empty:
                        break
                    block = False
                    stopping = stopping or cmd == "stop"
                    self._command(cmd, arg)
                    self._take_snapshot()
                if self.llm.has_unfinished():
                    self._busy_since = time.monotonic()
                    updates = self.llm.step()
                    last_collective, self._busy_since = time.monotonic(), None
                    if self.dead is not None:  # the watchdog gave up on this step: the others are gone
                        return
                    self._dispatch(updates)
                    self._take_snapshot(routing=not self.llm.has_unfinished())  # exact once work is done
                    if self._step_delay_s:
                        time.sleep(self._step_delay_s)
                elif stopping:
                    break
                elif time.monotonic() - last_collective >= self.ping_s:
                    self._busy_since = time.monotonic()
                    self.llm.ping()
                    last_collective, self._busy_since = time.monotonic(), None
                    self._take_snapshot(routing=True)
        except BaseException as e:  # a collective failed (a rank died), or a bug: nothing can run any more
            self._die(f"the engine stopped: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            return
        self.llm.release_followers()

    def _command(self, cmd: str, arg) -> None:
        if cmd == "submit":
            self._admit(arg)
        elif cmd == "abort":
            self._abort(arg)
        elif cmd == "abort_all":
            for sub_id in list(self._subs):
                self._abort(sub_id)

    def _admit(self, sub: Submission) -> None:
        if self.dead is not None:
            self._send(sub, ("error", 503, self.dead))
            return
        ids: list[str] = []
        self._subs[sub.id] = (sub, ids)
        for i, (prompt, params) in enumerate(zip(sub.prompts, sub.params)):
            for j, p in enumerate(params.choices(sub.n)):
                rid = f"{sub.id}-{i * sub.n + j}"
                self.llm.add_request(prompt, p, rid)
                ids.append(rid)
                self._route[rid] = (sub, i * sub.n + j)
                out = self.llm.output(rid)
                if out.finish_reason == "error":  # bad input: the whole request fails, nothing else runs
                    self._abort(sub.id)
                    self._send(sub, ("error", 400, f"prompt {i}: {out.error}" if len(sub.prompts) > 1 else out.error))
                    return
        self._send(sub, ("admitted",))

    def _abort(self, sub_id: str) -> None:
        """Abort a submission's requests; their ends ("abort") still reach its queue, for whoever listens."""
        _, ids = self._subs.pop(sub_id, (None, []))
        for rid in ids:
            self.llm.abort(rid)

    def _dispatch(self, updates) -> None:
        now = time.perf_counter()
        tok = self.llm.tokenizer
        for out in updates:
            route = self._route.get(out.request_id)
            if route is None:  # already finished
                continue
            sub, index = route
            new = list(out.new_token_ids)
            if new:
                last = self._last_token.get(out.request_id)
                if last is None and self.observe_ttft is not None:
                    self.observe_ttft(now - sub.arrival)
                elif last is not None and self.observe_itl is not None:
                    self.observe_itl(now - last)
                self._last_token[out.request_id] = now
            logprobs = out.logprobs[len(out.logprobs) - len(new):] if out.logprobs is not None else None
            top = out.top_logprobs[len(out.top_logprobs) - len(new):] if out.top_logprobs is not None else None
            tokens = None
            if logprobs is not None:
                ids = new + [t for row in top for t, _ in row]
                tokens = [tok.decode([t]) if tok is not None else f"token_id:{t}" for t in ids]
            delta = Delta(index, new, out.new_text, logprobs, top, tokens, out.finish_reason,
                          len(out.prompt_token_ids), len(out.token_ids))
            if out.finished:
                self._route.pop(out.request_id, None)
                self._last_token.pop(out.request_id, None)
                if self.on_finish is not None:
                    self.on_finish(out.finish_reason)
                entry = self._subs.get(sub.id)
                if entry is not None and all(r not in self._route for r in entry[1]):
                    del self._subs[sub.id]
            self._send(sub, ("update", delta))

    def _take_snapshot(self, routing: bool = False) -> None:
        snap = {**self.llm.occupancy(), "generated_tokens": self.llm.stats["generated_tokens"],
                "prompt_tokens": self.llm.stats["prompt_tokens"], "routed": self.snapshot["routed"]}
        now = time.monotonic()
        if routing or now - self._routed_at >= 1.0:  # NOTE: a host sync, at most once a second
            snap["routed"] = self.llm.routed_tokens()
            self._routed_at = now
        self.snapshot = snap  # one assignment: readers see a whole snapshot

    def _send(self, sub: Submission, event: tuple) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass

    def _die(self, message: str) -> None:
        if self.dead is not None:
            return
        self.dead = message
        print(f"error (rank 0): {message}", file=sys.stderr, flush=True)
        if self.on_dead is not None:
            self.on_dead(message)
        for sub, _ in list(self._subs.values()):
            self._send(sub, ("error", 503, message))
        self._fail_inbox()

    def _fail_inbox(self) -> None:
        while True:
            try:
                cmd, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "submit":
                self._send(arg, ("error", 503, self.dead))

    def _watchdog(self) -> None:
        while self.dead is None and self._thread.is_alive():
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > self.step_timeout_s:
                self._die(f"no answer from the other ranks for {self.step_timeout_s:g} s (a rank died or hangs)")
                return
            time.sleep(0.5)


def follow_leader(llm, timeout_s: float) -> int:
    """Non-leader ranks: run the leader's steps until it releases them (0). The leader's own end comes
    first, so SIGTERM and SIGINT are ignored here; a leader silent for `timeout_s` ends this rank (1)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(1.0)
            if time.monotonic() - llm.runner.last_heard > timeout_s:
                print(f"error (rank {os.environ.get('RANK', '?')}): no word from rank 0 for {timeout_s:g} s; "
                      f"exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="epkit-follower-watchdog", daemon=True).start()
    try:
        llm.follow()
    except RuntimeError as e:  # a collective failed: rank 0 is gone
        print(f"error (rank {os.environ.get('RANK', '?')}): lost rank 0: {(str(e).splitlines() or [''])[0]}",
              file=sys.stderr, flush=True)
        return 1
    return 0
