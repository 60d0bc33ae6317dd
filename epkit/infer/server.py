"""The OpenAI-compatible HTTP server: `launch/serve.py`.

    deepspeed --num_gpus 2 launch/serve.py --ep 2 --checkpoint DIR --port 8000
    python launch/serve.py --preset tiny --api-key secret             # EP=1, CPU too

Rank 0 runs uvicorn (FastAPI) and the engine thread (`EngineLoop`, which owns the `LLM`); the other
ranks only run the steps rank 0 broadcasts (`follow_leader`). Endpoints: POST /v1/completions and
/v1/chat/completions (OpenAI's bodies, `stream: true` as server-sent events ending `data: [DONE]`,
usage in the last event), GET /v1/models, /health (200 while the engine steps, 503 when it cannot or
is draining) and /metrics (Prometheus). With --api-key, /v1/* needs `Authorization: Bearer KEY`.

SIGTERM (or Ctrl-C) stops admission (503), lets running requests finish for up to --drain-s (a
second Ctrl-C: at once), aborts the rest, releases the other ranks and exits 0. A rank that dies or
stops answering makes every request fail with 503; the server exits 1 a few seconds later.

FastAPI, uvicorn and prometheus-client are imported by this module only, which `import epkit` and
offline inference never load.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from .engine_loop import Delta, EngineLoop, Submission, follow_leader
from .openai_api import ApiError, Choice, chunk, parse_request, response, split_tokens, usage, usage_chunk

PING_S = 2.0  # an idle leader pings the other ranks this often
DEAD_LINGER_S = 5.0  # after the engine died: answer 503 this long, then exit 1
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1, 2.5, 5, 10, 20, 40, 80)


class ServerState:
    def __init__(self, drain_s: float):
        self.drain_s = drain_s
        self.drain_deadline: float | None = None  # set by SIGTERM
        self.dead_at: float | None = None

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None


# ---- metrics --------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one server (its own registry): latencies observed by the engine thread, the
    rest read from the engine's snapshot at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("epkit_time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("epkit_inter_token_latency_seconds", "Time between two tokens of one request",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.finished = Counter("epkit_requests_finished", "Finished sequences (choices) by finish reason",
                                ["finish_reason"], registry=self.registry)

    def watch(self, engine: EngineLoop) -> None:
        self.registry.register(_EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, engine: EngineLoop):
        self.engine = engine

    def collect(self):
        s = self.engine.snapshot
        yield GaugeMetricFamily("epkit_engine_up", "1 while the engine steps, 0 once a rank failed",
                                value=0 if self.engine.dead else 1)
        yield GaugeMetricFamily("epkit_num_requests_running", "Sequences in the running batch", value=s["running"])
        yield GaugeMetricFamily("epkit_num_requests_waiting", "Sequences waiting for a place", value=s["waiting"])
        yield GaugeMetricFamily("epkit_kv_cache_blocks_used", "KV-cache blocks held by sequences",
                                value=s["kv_blocks_used"])
        yield GaugeMetricFamily("epkit_kv_cache_blocks_total", "KV-cache blocks in the pool",
                                value=s["kv_blocks_total"])
        yield CounterMetricFamily("epkit_generation_tokens", "Generated tokens", value=s["generated_tokens"])
        yield CounterMetricFamily("epkit_prompt_tokens", "Prompt tokens prefilled", value=s["prompt_tokens"])
        routed = s["routed"]
        if routed is not None:
            per_expert = CounterMetricFamily("epkit_routed_tokens", "Tokens routed to each expert (every top-k "
                                             "choice counts)", labels=["layer", "expert"])
            for layer, row in enumerate(routed["per_expert"]):
                for e, v in enumerate(row):
                    per_expert.add_metric([str(layer), str(e)], v)
            yield per_expert
            per_rank = CounterMetricFamily("epkit_rank_routed_tokens", "Tokens routed to the experts each EP rank "
                                           "holds, all layers", labels=["ep_rank"])
            for r, v in enumerate(routed["per_rank"]):
                per_rank.add_metric([str(r)], v)
            yield per_rank


# ---- the app --------------------------------------------------------------------------------------

def create_app(engine: EngineLoop, metrics: Metrics, state: ServerState, model_name: str,
               api_key: str | None = None):
    """The FastAPI app over a started `EngineLoop`."""
    llm = engine.llm
    app = FastAPI(title="epkit", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown paths and methods, in OpenAI's shape
        return error(ApiError(exc.status_code, str(exc.detail)))

    def refuse(request: Request) -> ApiError | None:
        sent = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            return ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        if request.url.path == "/v1/models":
            return None
        if engine.dead is not None:
            return ApiError(503, f"the engine is down: {engine.dead}")
        if state.draining:
            return ApiError(503, "the server is shutting down and takes no new requests")
        return None

    async def generate(request: Request, kind: str):
        bad = refuse(request)
        if bad is not None:
            return error(bad)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return error(ApiError(400, f"the request body is not valid JSON: {e}"))
        try:
            req = parse_request(body, kind, [model_name], llm.args.vocab_size, llm.max_model_len)
        except ApiError as e:
            return error(e)
        sub = Submission(("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex, req.prompts,
                         [req.params] * len(req.prompts), req.n, asyncio.Queue(), asyncio.get_running_loop())
        if sub.size > engine.capacity:
            return error(ApiError(400, f"{len(req.prompts)} prompt(s) x n={req.n} is {sub.size} sequences, more than "
                                       f"this server holds at once ({engine.capacity})", "n"))
        if not engine.reserve(sub.size):
            return error(ApiError(429, f"the server's queue is full ({engine.capacity} sequences); retry later"))
        ticket = _Ticket(engine, sub)
        try:
            engine.submit(sub)
            event = await sub.events.get()
            if event[0] == "error":
                return error(ApiError(event[1], event[2], "prompt" if event[1] == 400 else None))
            if req.stream:
                stream = _EventStream(_events(req, ticket), media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache"})
                stream.ticket, ticket = ticket, None  # the stream closes it when it ends
                return stream
            return await _answer(request, req, ticket)
        finally:
            if ticket is not None:
                ticket.close()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        bad = refuse(request)
        if bad is not None:
            return error(bad)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "epkit", "max_model_len": llm.max_model_len}]}

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return JSONResponse({"status": "dead", "error": engine.dead}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app


async def _answer(request: Request, req, ticket: "_Ticket") -> Response:
    """The whole answer of a request that does not stream; a client that went away gets nothing (its
    request is aborted when the ticket closes)."""
    sub = ticket.sub
    choices = [Choice() for _ in range(sub.size)]
    prompt_tokens = [0] * len(req.prompts)
    checked = time.monotonic()
    while ticket.finished < sub.size:
        try:
            event = await asyncio.wait_for(sub.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            event = None
        if time.monotonic() - checked >= 0.5:
            checked = time.monotonic()
            if await request.is_disconnected():
                return Response(status_code=499)
        if event is None:
            continue
        if event[0] == "error":
            return JSONResponse(ApiError(event[1], event[2]).body(), status_code=event[1])
        d: Delta = event[1]
        _add(choices[d.index], d)
        prompt_tokens[d.index // req.n] = d.prompt_tokens
        ticket.finished += d.finish_reason is not None
    use = usage(sum(prompt_tokens), sum(len(c.token_ids) for c in choices))
    return JSONResponse(response(req, sub.id, choices, use))


def _add(c: Choice, d: Delta) -> None:
    c.text += d.text or ""
    c.token_ids += d.token_ids
    if d.logprobs is not None:
        tokens, top = split_tokens(d)
        c.logprobs += d.logprobs
        c.tokens += tokens
        c.top += top
    c.finish_reason = d.finish_reason or c.finish_reason


class _Ticket:
    """A request's hold on the engine: `close()` aborts what has not finished and frees its queue places."""

    def __init__(self, engine: EngineLoop, sub: Submission):
        self.engine, self.sub, self.finished, self.closed = engine, sub, 0, False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.finished < self.sub.size:
                self.engine.abort(self.sub.id)
            self.engine.release(self.sub.size)


class _EventStream(StreamingResponse):
    """Closes its ticket however the response ends (done, client gone, never started)."""
    ticket: _Ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.close()


async def _events(req, ticket: _Ticket):
    """Server-sent events of one request. A client that goes away cancels this (Starlette)."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    sub = ticket.sub
    offsets = [0] * sub.size
    prompt_tokens, completion_tokens = [0] * len(req.prompts), [0] * sub.size
    if req.kind == "chat":
        for i in range(sub.size):
            yield event(chunk(req, sub.id, i, "", [], [], [], [], None, first=True))
    while ticket.finished < sub.size:
        kind, *rest = await sub.events.get()
        if kind == "error":
            yield event(ApiError(rest[0], rest[1]).body())
            break
        d: Delta = rest[0]
        prompt_tokens[d.index // req.n], completion_tokens[d.index] = d.prompt_tokens, d.completion_tokens
        ticket.finished += d.finish_reason is not None
        if not (d.text or d.finish_reason or d.token_ids and (req.return_token_ids or d.logprobs is not None)):
            continue
        tokens, top = split_tokens(d) if d.logprobs is not None else ([], [])
        yield event(chunk(req, sub.id, d.index, d.text or "", d.token_ids, tokens, d.logprobs, top,
                          d.finish_reason, offsets[d.index]))
        offsets[d.index] += sum(len(t) for t in tokens)
    else:
        yield event(usage_chunk(req, sub.id, usage(sum(prompt_tokens), sum(completion_tokens))))
    yield "data: [DONE]\n\n"


# ---- the command ----------------------------------------------------------------------------------

def parse_args(argv=None):
    from .cli import model_flags, read_config
    p = model_flags("Serve a Mixtral checkpoint over HTTP with OpenAI's API (completions, chat, streaming).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    p.add_argument("--api-key", default=os.environ.get("EPKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EPKIT_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                   "checkpoint path or the preset name)")
    p.add_argument("--max-queue", type=int, default=1024, help="sequences that may wait beyond the --max-num-seqs "
                   "running ones; more get 429")
    p.add_argument("--drain-s", type=float, default=30.0, help="on SIGTERM, how long running requests may finish")
    p.add_argument("--rank-timeout-s", type=float, default=30.0, help="a step (or ping) taking longer means a rank "
                   "died or hangs: answer 503 and exit 1 (first-use compiles happen in a warm-up before serving)")
    cfg = read_config(p, argv)
    if not 0 <= cfg.port <= 65535:
        raise ValueError(f"--port {cfg.port} must be in [0, 65535]")
    for name in ("max_queue", "drain_s"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    if cfg.rank_timeout_s <= 0:
        raise ValueError(f"--rank-timeout-s {cfg.rank_timeout_s} must be > 0")
    return cfg


def main(argv=None) -> int:
    from .cli import build_llm, resolve_checkpoint
    cfg = parse_args(argv)
    if cfg.engine.dp_size > 1:  # every rank alike, before any work
        raise ValueError(f"--dp {cfg.engine.dp_size}: launch/serve.py serves one engine (data-parallel replicas are "
                         f"for launch/infer.py); launch ep ranks, or use --dp-attention to spread requests over them")
    # idle followers wait for the leader however long there is no request; the watchdog decides when silence
    # means death (offline runs wait --dist-timeout)
    from .runner import UNBOUNDED_CONTROL_TIMEOUT
    cfg.engine = cfg.engine.replace(follower_wait=UNBOUNDED_CONTROL_TIMEOUT.total_seconds())
    llm, source = build_llm(cfg)  # every rank
    _warm_up(llm)
    if not llm.is_leader:
        return follow_leader(llm, cfg.rank_timeout_s + 2 * PING_S)
    name = cfg.served_model_name or (cfg.preset or cfg.lora or resolve_checkpoint(cfg.checkpoint) or "tiny")
    state, metrics = ServerState(cfg.drain_s), Metrics()

    def on_dead(message: str) -> None:
        state.dead_at = time.monotonic()

    engine = EngineLoop(llm, llm.scheduler.max_num_seqs + cfg.max_queue, PING_S, cfg.rank_timeout_s, on_dead,
                        metrics.ttft.observe, metrics.itl.observe, lambda r: metrics.finished.labels(r).inc())
    metrics.watch(engine)
    app = create_app(engine, metrics, state, name, cfg.api_key)
    engine.start()
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=5), engine, state,
                     f"serving {source} as {name!r} at EP={int(os.environ.get('WORLD_SIZE', 1))}")
    try:
        server.run()
    finally:
        if engine.dead is None:
            engine.stop()  # after the drain: nothing runs; this releases the other ranks
    if engine.dead is not None:
        print(f"exiting: {engine.dead}", file=sys.stderr, flush=True)
        os._exit(1)  # the engine thread may sit in a collective that never returns: do not wait for it
    print("drained; exiting", file=sys.stderr, flush=True)
    return 0


def _warm_up(llm) -> None:
    """Every rank: a short prefill and decode before serving, so that first-use costs (kernel compiles,
    CUDA graph captures) do not fall into a request's step and trip --rank-timeout-s. Counters restart."""
    from .sampling import SamplingParams
    llm.generate([[1] * 16, [1] * 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm.model.routing_stats.reset()
    llm.stats.update({k: type(v)() for k, v in llm.stats.items()})


class _Server(uvicorn.Server):
    """uvicorn's server with epkit's shutdown: SIGTERM drains instead of closing at once."""

    def __init__(self, config, engine: EngineLoop, state: ServerState, banner: str):
        super().__init__(config)
        self.engine, self.state, self.banner = engine, state, banner
        self._aborted_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM / SIGINT: drain. A second SIGINT (Ctrl-C twice) aborts what still runs; a second SIGTERM
        changes nothing (launchers such as deepspeed's send one after the signal they pass on)."""
        now = time.monotonic()
        if not self.state.draining:
            self.state.drain_deadline = now + self.state.drain_s
            msg = f"signal {sig}: no new requests; draining up to {self.state.drain_s:g}s"
        elif sig == signal.SIGINT:
            self.state.drain_deadline = now
            msg = "second interrupt: aborting what still runs"
        else:
            return
        os.write(2, (msg + "\n").encode())  # not print(): it could re-enter a write this signal interrupted

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
        print(f"{self.banner}; listening on http://{self.config.host}:{port}", file=sys.stderr, flush=True)

    async def on_tick(self, counter: int) -> bool:
        now, st = time.monotonic(), self.state
        if st.dead_at is not None and now - st.dead_at >= DEAD_LINGER_S:
            return True
        if st.draining and st.dead_at is None:
            if self.engine.idle:
                return True
            if now >= st.drain_deadline and self._aborted_at is None:
                self.engine.abort_all()
                self._aborted_at = now
            if self._aborted_at is not None and now - self._aborted_at >= 3.0:  # the aborts did not arrive
                return True
        return await super().on_tick(counter)
