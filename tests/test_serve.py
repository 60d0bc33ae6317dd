"""launch/serve.py as users run it: a real server on 127.0.0.1 in a subprocess (tiny preset, CPU), spoken
to with the official `openai` client and `httpx`.

  - completions and chat, streaming and not, through the openai client: equal to `LLM.generate` offline;
  - 200 requests from a bounded loopback load generator: each answered once, equal to its offline result;
  - a full queue answers 429; a client that goes away mid-stream frees its KV blocks (read from /metrics);
  - every bad input gets 400 and a message naming it, and the server keeps serving;
  - the API key; SIGTERM drains, then exits 0; an EP=2 server on gloo answers like EP=1, and when one
    of its ranks dies it answers 503 and exits non-zero.

One server process per configuration, shared by the tests that use it.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from distributed import free_port
from epkit.infer import SamplingParams
from epkit.infer.cli import build_llm, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "launch", "serve.py")
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = ["Once upon a time", "The golden owl lives in the", "three plus four is", "In the forest you can find a",
        "Ada keeps a map in the", "The quick brown fox"]
CHAT = [{"role": "system", "content": "You are a helpful storyteller."}, {"role": "user", "content": "Who has a map?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


class Server:
    def __init__(self, procs, logs, url):
        self.procs, self.logs, self.url = procs, logs, url

    def log(self, rank: int = 0) -> str:
        with open(self.logs[rank]) as f:
            return f.read()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def start_server(tmp_path, args, ranks: int = 1, timeout: float = 180) -> Server:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    master = str(free_port())
    procs, logs = [], []
    for rank in range(ranks):
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=master)
        logs.append(str(tmp_path / f"rank{rank}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, SERVE, "--preset", "tiny", "--port", "0", *args],
                                          cwd=str(tmp_path), env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    server = Server(procs, logs, None)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", server.log())
            if m:
                server.url = m.group(1)
                return server
            assert all(p.poll() is None for p in procs), "a rank exited:\n" + "\n".join(map(server.log, range(ranks)))
            time.sleep(0.2)
        raise AssertionError(f"no server after {timeout}s:\n{server.log()}")
    except BaseException:
        server.kill()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve"), ["--api-key", KEY, "--max-num-seqs", "32", "--max-queue", "32"])
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def offline():
    """The same model and tokenizer, served offline in this process (EP=1)."""
    return build_llm(parse_args(["--preset", "tiny"]))[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def sse(lines) -> list:
    """The data of each server-sent event: parsed JSON, or the closing '[DONE]'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def until(cond, timeout: float = 30, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- EP=1: the openai client --------------------------------------------------------------------------

def test_openai_client_completions_equal_offline(client, offline):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    ref = offline.generate(TEXT[:3], GREEDY)
    out = client.completions.create(model="tiny", prompt=TEXT[:3], max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [(c.text, c.token_ids, c.finish_reason) for c in out.choices] == \
        [(r.text, r.token_ids, r.finish_reason) for r in ref]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert out.usage.completion_tokens == sum(len(r.token_ids) for r in ref)
    # Token-id prompts, seeded sampling with n choices, top_k through extra_body.
    ids = [[1, 15, 27, 301, 42], [1, 99, 7]]
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=5, max_tokens=10, ignore_eos=True)
    ref = offline.generate([ids[0]] * 2 + [ids[1]] * 2, p.choices(2) * 2)
    out = client.completions.create(model="tiny", prompt=ids, n=2, max_tokens=10, temperature=0.8, top_p=0.9, seed=5,
                                    extra_body={"top_k": 40, "ignore_eos": True, "return_token_ids": True})
    assert [c.token_ids for c in out.choices] == [r.token_ids for r in ref]
    assert ref[0].token_ids != ref[1].token_ids
    # Streaming: the pieces of each choice join to the offline text; usage comes last.
    ref = offline.generate(TEXT[3:5], GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt=TEXT[3:5], max_tokens=12, temperature=0,
                                            stream=True))
    for i, r in enumerate(ref):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == r.text and mine[-1].finish_reason == r.finish_reason
        assert sum(c.finish_reason is not None for c in mine) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(r.token_ids) for r in ref)
    # logprobs of the chosen tokens, as the engine computes them.
    ref = offline.generate([TEXT[5]], SamplingParams(temperature=0, max_tokens=6, logprobs=2))[0]
    out = client.completions.create(model="tiny", prompt=TEXT[5], max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert len(lp.top_logprobs) == 6 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text == ref.text


def test_openai_client_chat_equals_offline(server, client, offline):
    ref = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0]
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                         extra_body={"return_token_ids": True})
    c = out.choices[0]
    assert (c.message.role, c.message.content, c.token_ids, c.finish_reason) == \
        ("assistant", ref.text, ref.token_ids, ref.finish_reason)
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=1))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == \
        len(ref.token_ids)
    assert chunks[-1].usage.total_tokens == len(ref.prompt_token_ids) + len(ref.token_ids)
    # The raw stream ends with `data: [DONE]`, usage in the event before it.
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": CHAT, "max_tokens": 4, "stream": True}) as r:
        events = sse(r.iter_lines())
    assert r.status_code == 200 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] <= 4


# ---- EP=1: load, queue, disconnects, bad input, API key ------------------------------------------------

def test_200_concurrent_requests_each_answered_once(server, offline):
    prompts = [TEXT[i % len(TEXT)] + " " * (i % 3) for i in range(200)]
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 5) if i % 4 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=8, ignore_eos=True) for i in range(200)]
    ref = offline.generate(prompts, params)
    answers: dict[int, list] = {}

    async def one(http, sem, i):
        p = params[i]
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": p.max_tokens, "temperature": p.temperature,
                "seed": p.seed, "ignore_eos": p.ignore_eos, "return_token_ids": True, "stream": i % 2 == 0}
        async with sem:
            if body["stream"]:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    events = sse([line async for line in r.aiter_lines()])
                assert events[-1] == "[DONE]" and events[-2]["choices"] == []
                pieces = [e["choices"][0] for e in events[:-2]]
                assert sum(c["finish_reason"] is not None for c in pieces) == 1
                got = (sum((c["token_ids"] for c in pieces), []), "".join(c["text"] for c in pieces))
            else:
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                c = r.json()["choices"]
                assert len(c) == 1
                got = (c[0]["token_ids"], c[0]["text"])
        answers.setdefault(i, []).append(got)

    async def main():
        sem = asyncio.Semaphore(48)  # the server holds 32 running + 32 waiting
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=48, keepalive_expiry=1.0)) as http:
            # (idle connections expire before the server's 5 s keep-alive: no request on a closing socket)
            await asyncio.gather(*(one(http, sem, i) for i in range(200)))

    asyncio.run(main())
    assert sorted(answers) == list(range(200)) and all(len(a) == 1 for a in answers.values())
    for i, r in enumerate(ref):
        assert answers[i][0] == (r.token_ids, r.text), f"request {i}"
    until(lambda: metric(server.url, "epkit_kv_cache_blocks_used") == 0, what="KV blocks to return")


def test_full_queue_answers_429(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            big = asyncio.create_task(http.post("/v1/completions", json={
                "prompt": TEXT * 10, "max_tokens": 64, "ignore_eos": True, "temperature": 0}))
            while metric(server.url, "epkit_num_requests_running") == 0:
                assert not big.done(), big.result().text
                await asyncio.sleep(0.05)
            extra = await http.post("/v1/completions", json={"prompt": TEXT[:5], "max_tokens": 2})
            assert extra.status_code == 429, extra.text
            assert extra.json()["error"]["type"] == "rate_limit_error" and "queue is full" in extra.text
            done = await big
            assert done.status_code == 200 and len(done.json()["choices"]) == 60
            assert (await http.post("/v1/completions", json={"prompt": TEXT[:5], "max_tokens": 2})).status_code == 200

    asyncio.run(main())


def test_client_gone_mid_stream_frees_its_kv_blocks(server):
    aborts = metric(server.url, "epkit_requests_finished_total", '{finish_reason="abort"}')
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": TEXT[0], "max_tokens": 480, "ignore_eos": True,
                                                          "stream": True}) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(4)][0].startswith("data: ")  # two events: tokens are flowing
            assert metric(server.url, "epkit_kv_cache_blocks_used") > 0
        # the connection is closed here, long before 480 tokens
    until(lambda: metric(server.url, "epkit_kv_cache_blocks_used") == 0
          and metric(server.url, "epkit_num_requests_running") == 0, what="the aborted stream's KV blocks")
    assert metric(server.url, "epkit_requests_finished_total", '{finish_reason="abort"}') == aborts + 1
    # A client that gives up on a request that does not stream aborts it too: it hangs up once the request runs
    # (a fixed client timeout raced the server on a loaded machine: gone before the request was read, no abort).
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": TEXT[1], "max_tokens": 480, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: metric(server.url, "epkit_num_requests_running") == 1, what="the request to run")
    until(lambda: metric(server.url, "epkit_requests_finished_total", '{finish_reason="abort"}') == aborts + 2,
          what="the abandoned request's abort")
    assert metric(server.url, "epkit_kv_cache_blocks_used") == 0


BAD = [  # (endpoint, body, words the message must hold)
    ("completions", b"{not json", "not valid JSON"),
    ("completions", b"[1, 2]", "must be a JSON object"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, "model 'gpt-4' is not served"),
    ("completions", {"prompt": ""}, "empty prompt"),
    ("completions", {"prompt": []}, "empty prompt"),
    ("completions", {"prompt": ["fine", ""]}, "prompt 1: empty prompt"),
    ("completions", {"prompt": [5] * 600}, "prompt has 600 tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens=0"),
    ("completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens=-3"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature=-0.5"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p=0"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p=1.5"),
    ("completions", {"prompt": [1, 512]}, "token id 512 is outside the vocabulary"),
    ("completions", {"prompt": [[1, 2], [-1]]}, "token id -1 is outside the vocabulary"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens='5'"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature='hot'"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream='yes' must be true or false"),
    ("completions", {"prompt": "hi", "n": "2"}, "n='2'"),
    ("completions", {"prompt": "hi", "n": 0}, "n=0"),
    ("completions", {"prompt": 5}, "prompt must be a string"),
    ("completions", {"prompt": [1, "a"]}, "prompt must be a string"),
    ("completions", {"prompt": "hi", "stop": 5}, "stop=5"),
    ("completions", {"prompt": "hi", "seed": 1.5}, "seed=1.5"),
    ("completions", {"prompt": "hi", "ignore_eos": "false"}, "ignore_eos='false'"),
    ("completions", {"prompt": "hi", "logprobs": 50}, "logprobs=50"),
    ("completions", {"prompt": "hi", "echo": True}, "echo=True is not supported"),
    ("completions", {"prompt": "hi", "temprature": 0.5}, "unrecognized request argument(s) supplied: temprature"),
    ("completions", {"max_tokens": 3}, "prompt is missing"),
    ("chat", {"messages": "hi"}, "messages must be a non-empty list"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}], "stream": True}, "messages[0].role='robot'"),
    ("chat", {"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "x " * 600}]}, "the context holds 512"),
    ("chat", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    ("completions", {"prompt": TEXT, "n": 20}, "120 sequences, more than this server holds at once (64)"),
]


def test_every_bad_input_gets_400_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server.url + "/v1", headers=AUTH, timeout=60) as http:
        for endpoint, body, words in BAD:
            path = "/completions" if endpoint == "completions" else "/chat/completions"
            r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
            assert r.status_code == 400, (body, r.status_code, r.text)
            err = r.json()["error"]
            assert words in err["message"] and err["type"] == "invalid_request_error", (body, err)
        assert http.post("/nope", json={}).status_code == 404 and "error" in http.post("/nope", json={}).json()
        ok = http.post("/completions", json={"prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert metric(server.url, "epkit_kv_cache_blocks_used") == 0


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # health needs no key


# ---- SIGTERM --------------------------------------------------------------------------------------------

def test_sigterm_drains_then_exits_0(tmp_path, monkeypatch):
    # 20 ms per step: the long request (480 tokens) then runs ~10 s, so "still running" below does not
    # depend on how fast this machine decodes (on an idle machine it finished within the checks).
    monkeypatch.setenv("EPKIT_FAULT_STEP_DELAY_S", "0.02")
    s = start_server(tmp_path, ["--drain-s", "60"])
    try:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as http:
                async def stream(max_tokens, started):
                    body = {"prompt": TEXT[0], "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                            "stream": True, "return_token_ids": True}
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        lines = []
                        async for line in r.aiter_lines():
                            lines.append(line)
                            if line.startswith("data: "):
                                started.set()
                    return sse(lines)

                started = [asyncio.Event(), asyncio.Event()]
                short = asyncio.create_task(stream(16, started[0]))
                long = asyncio.create_task(stream(480, started[1]))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
                s.procs[0].send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
                assert (await http.get("/health")).status_code == 503
                events = await short  # running requests finish
                assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 16
                assert [e for e in events[:-2] if e["choices"][0]["finish_reason"]][0]["choices"][0][
                    "finish_reason"] == "length"
                assert not long.done()
                s.procs[0].send_signal(signal.SIGTERM)  # a second SIGTERM changes nothing
                await asyncio.sleep(0.3)
                assert not long.done()
                s.procs[0].send_signal(signal.SIGINT)  # a second Ctrl-C ends the drain now
                events = await long
                finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0]["finish_reason"]]
                assert finish == ["abort"] and events[-1] == "[DONE]"
                assert events[-2]["usage"]["completion_tokens"] < 480

        asyncio.run(main())
        assert s.procs[0].wait(timeout=60) == 0, s.log()
        assert "drained; exiting" in s.log()
    finally:
        s.kill()


# ---- EP=2 ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["replicated", "dp-attention"])
def ep2(tmp_path_factory, request):
    mode = ["--dp-attention"] if request.param == "dp-attention" else []
    s = start_server(tmp_path_factory.mktemp("ep2"), ["--ep", "2", "--rank-timeout-s", "20", *mode], ranks=2)
    try:
        yield s
    finally:
        s.kill()


def test_ep2_server_answers_like_ep1(ep2, offline):
    http = httpx.Client(base_url=ep2.url + "/v1", timeout=120)
    ref = offline.generate(TEXT, GREEDY)
    r = http.post("/completions", json={"prompt": TEXT, "max_tokens": 12, "temperature": 0, "return_token_ids": True})
    assert [c["token_ids"] for c in r.json()["choices"]] == [o.token_ids for o in ref]
    p = SamplingParams(temperature=0.8, seed=9, max_tokens=10, ignore_eos=True)
    ref = offline.generate([TEXT[1]] * 3, p.choices(3))
    r = http.post("/completions", json={"prompt": TEXT[1], "n": 3, "max_tokens": 10, "temperature": 0.8, "seed": 9,
                                        "ignore_eos": True, "return_token_ids": True})
    assert [c["token_ids"] for c in r.json()["choices"]] == [o.token_ids for o in ref]
    chat = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10))[0]
    with http.stream("POST", "/chat/completions", json={"messages": CHAT, "max_tokens": 10, "temperature": 0,
                                                        "stream": True}) as r:
        events = sse(r.iter_lines())
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == chat.text
    until(lambda: all(metric(ep2.url, "epkit_rank_routed_tokens_total", f'{{ep_rank="{k}"}}') > 0 for k in (0, 1)),
          what="routed tokens on both EP ranks")
    assert httpx.get(ep2.url + "/health").status_code == 200


def test_ep2_dead_rank_gives_503_and_a_nonzero_exit(ep2):
    killed = time.time()
    ep2.procs[1].kill()
    ep2.procs[1].wait(timeout=30)
    r = httpx.post(ep2.url + "/v1/completions", json={"prompt": TEXT[0], "max_tokens": 4}, timeout=60)
    assert r.status_code == 503, r.text
    assert "engine" in r.json()["error"]["message"]
    assert httpx.get(ep2.url + "/health", timeout=30).status_code == 503
    code = ep2.procs[0].wait(timeout=60)
    assert code != 0 and time.time() - killed < 60, ep2.log()
