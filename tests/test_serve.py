"""`localsteer serve` (localsteer/server.py) on the real SmolLM2-135M, driven by the official
`openai` package as a client: greedy replies equal `generate`'s with the same steering, streaming
and not; concurrent requests with different vectors each get what they get alone; a client that
goes away frees its slot; every bad request is an OpenAI error naming its field; a short load test."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from localsteer import api, server  # noqa: E402

REPO = Path(__file__).parent.parent
GREEDY = api.sampling_config(temperature=0)
ASK = [{"role": "user", "content": "Tell me about your day."}]
KEY = "s3cret"


class Running:
    """A server on a free loopback port, in this process."""

    def __init__(self, model, slots=2, queue=4, n_ctx=1024, api_key=None, user_dir=None, defaults=server.Defaults(),
                 name="smollm2-135m-instruct", batch=False):
        index = server.vector_index(model, name, user_dir=user_dir)
        self.engine = server.Engine(model, slots=slots, queue=queue, n_ctx=n_ctx, n_threads=1, batch=batch)
        app = server.make_app(server.Service(model, name, self.engine, index, defaults, api_key))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()

    def post(self, path, body, **kw):
        return httpx.post(self.url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                          timeout=60, **kw)


@pytest.fixture(scope="module")
def srv(smol):
    s = Running(smol)
    yield s
    s.close()


def generate(smol, specs, max_tokens=24, layers=None, rejection=None):
    steering = api.steering_from_specs(smol, specs, layers)
    return api.generate(smol, ASK, steering, GREEDY, max_tokens=max_tokens, rejection=rejection, n_threads=1)


def chat(srv, steering=None, max_tokens=24, stream=False, **kw):
    extra = {} if steering is None else {"extra_body": {"steering": steering}}
    return srv.client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=max_tokens,
                                              temperature=0, stream=stream, **extra, **kw)


def test_greedy_replies_equal_generate_streaming_or_not(smol, srv):
    want = generate(smol, ["happy-sad:4"])
    got = chat(srv, {"vectors": [{"name": "happy-sad", "scale": 4}], "events": True})
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.tokens) and got.usage.prompt_tokens == want.n_prompt
    summary = got.model_extra["steering"]
    assert summary["applied"] == "4 x happy-sad.gguf on layers 7-24" and summary["statuses"] == {"steered": 24}
    assert [e["token"] for e in summary["events"]] == want.tokens

    chunks = list(chat(srv, {"vectors": ["happy-sad:4"]}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"

    plain = generate(smol, [])
    assert chat(srv).choices[0].message.content == plain.text  # no steering field: the server's defaults (none)
    assert chat(srv, {"vectors": None}).choices[0].message.content == plain.text

    rejected = generate(smol, ["happy-sad:8"], rejection=api.rejection_config(5))
    got = chat(srv, {"vectors": ["happy-sad:8"], "reject": {"topk": 5}})
    assert got.choices[0].message.content == rejected.text
    assert got.model_extra["steering"]["applied"].endswith("; reject top-5")

    text = srv.client.completions.create(model="x", prompt="The ocean is", max_tokens=12, temperature=0,
                                         extra_body={"steering": {"vectors": ["happy-sad:4"]}})
    raw = api.generate(smol, "The ocean is", api.steering_from_specs(smol, ["happy-sad:4"]), GREEDY, max_tokens=12,
                       raw=True, n_threads=1)
    assert text.choices[0].text == raw.text


def test_directer_instruction_per_request(smol, srv):
    messages = [{"role": "user", "content": "Describe the ocean. Answer in French."}]
    want = api.generate_directer(smol, messages[0]["content"], mark="Answer in French.", sampling=GREEDY,
                                 max_tokens=16, n_threads=1)
    got = srv.client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0,
                                             extra_body={"steering": {"instruction": "Answer in French."}})
    assert got.choices[0].message.content == want.text
    assert got.model_extra["steering"]["applied"].startswith("DIRECTER x100 on prompt tokens")


def test_concurrent_requests_with_different_vectors_get_what_they_get_alone(smol, srv):
    alone = {spec: generate(smol, [spec], max_tokens=32).text for spec in ("happy-sad:4", "happy-sad:-4", "uppercase")}
    with ThreadPoolExecutor(3) as pool:
        got = dict(zip(alone, pool.map(lambda s: chat(srv, {"vectors": [s]}, max_tokens=32).choices[0].message.content,
                                       alone)))
    assert got == alone


def test_a_client_that_goes_away_frees_its_slot(srv):
    body = {"messages": ASK, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while next(lines) == "" or srv.engine.busy_slots == 0:
            pass
        assert srv.engine.busy_slots == 1
    deadline = time.monotonic() + 10
    while srv.engine.busy_slots:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)


BAD = [
    ("unknown vector", {"steering": {"vectors": ["nope"]}}, 400, "steering.vectors[0].name", "unknown vector 'nope'"),
    ("bad scale", {"steering": {"vectors": ["happy-sad:x"]}}, 400, "steering.vectors[0]", "bad scale"),
    ("infinite scale", {"steering": {"vectors": [{"name": "happy-sad", "scale": 1e999}]}}, 400,
     "steering.vectors[0].scale", "must be between"),
    ("bad layers", {"steering": {"vectors": ["happy-sad"], "layers": "0-99"}}, 400, "steering.layers", "outside"),
    ("unknown field", {"steering": {"vector": ["happy-sad"]}}, 400, "steering.vector", "unknown field"),
    ("bad top-k", {"steering": {"vectors": ["happy-sad"], "reject": {"topk": 0}}}, 400, "steering.reject.topk",
     "between"),
    ("instruction absent", {"steering": {"instruction": "in Klingon"}}, 400, "steering.instruction.text",
     "not in the prompt"),
    ("n=2", {"n": 2}, 400, "n", "n must be 1"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens", "between"),
    ("temperature 5", {"temperature": 5}, 400, "temperature", "between"),
    ("no messages", {"messages": []}, 400, "messages", "non-empty"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role"),
]


@pytest.mark.parametrize("case,change,status,param,match", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_openai_errors_naming_the_field(srv, case, change, status, param, match):
    r = srv.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"] and err["type"] == "invalid_request_error"


def test_bad_bodies_keys_and_files(smol, tmp_path):
    user = tmp_path / "vectors"
    user.mkdir()
    shutil.copy(REPO / "vectors" / "qwen2.5-coder-0.5b-instruct" / "happy-sad.gguf", user / "qwen-happy.gguf")
    s = Running(smol, slots=1, queue=0, api_key=KEY, user_dir=user)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        r = s.post("/v1/chat/completions", {"messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in s.client.models.list()] == ["smollm2-135m-instruct"]
        r = s.post("/v1/chat/completions", "{not json", headers=auth)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = s.post("/v1/chat/completions", b"x" * (server.MAX_BODY + 1), headers=auth)
        assert r.status_code == 413
        vectors = {v["id"]: v for v in httpx.get(s.url + "/v1/steering/vectors", headers=auth).json()["data"]}
        assert vectors["happy-sad"]["fits_model"] and vectors["happy-sad"]["layers"] == "7-24"
        assert not vectors["qwen-happy"]["fits_model"]
        r = s.post("/v1/chat/completions", {"messages": ASK, "steering": {"vectors": ["qwen-happy"]}}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].name"
        # a request names vectors, never files
        r = s.post("/v1/chat/completions", {"messages": ASK, "steering": {"vectors": [str(user / "qwen-happy.gguf")]}},
                   headers=auth)
        assert r.status_code == 400 and "unknown vector" in r.json()["error"]["message"]
        # one slot, no queue: a second request while the first runs gets 503 with Retry-After
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers=auth, timeout=30,
                          json={"messages": ASK, "max_tokens": 2000, "stream": True}) as first:
            next(first.iter_lines())
            r = s.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4}, headers=auth)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(s.url + "/health").json()["status"] == "ok"  # never dies on a request
    finally:
        s.close()


def test_load_four_clients(srv, capsys):
    """4 clients x 5 requests of 16 tokens on loopback: no errors; latency reported."""
    def one(i):
        t0 = time.perf_counter()
        r = chat(srv, {"vectors": [f"happy-sad:{(i % 3) + 1}"]}, max_tokens=16)
        assert r.choices[0].message.content
        return time.perf_counter() - t0

    with ThreadPoolExecutor(4) as pool:
        latencies = sorted(pool.map(one, range(20)))
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    with capsys.disabled():
        print(f"\nserve load: 20 requests, 4 clients, 2 slots: p50 {p50:.2f} s, p95 {p95:.2f} s")


def test_the_command_serves_and_stops_on_ctrl_c():
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "localsteer.cli", "serve", "-m", "smollm2-135m-instruct", "--port", str(port), "-t", "1",
           "--slots", "1", "-v", "happy-sad:4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="x", messages=ASK, max_tokens=4, temperature=0)
        assert r.model_extra["steering"]["applied"] == "4 x happy-sad.gguf on layers 7-24"  # the server's default
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode in (0, 130) and "Traceback" not in err.decode(), err.decode()

    bad = subprocess.run(cmd[:-1] + ["nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr, bad.stderr


def test_adapters_and_the_probe_gate_per_request(qwen05):
    """On Qwen2.5-Coder-0.5B with the refusal ablation adapter and the harmful-prompt probe the
    server was started with: a request names the adapter and turns the gate on or off."""
    qdir = REPO / "vectors" / "qwen2.5-coder-0.5b-instruct"
    adapters = api.load_adapters(qwen05, [str(qdir / "refusal" / "refusal-ablate.gguf")])
    gate = api.load_gate(qwen05, qdir / "probes" / "harmful.gguf")
    defaults = server.Defaults(loras={"refusal-ablate": adapters[0]}, gate=gate)
    s = Running(qwen05, slots=1, defaults=defaults, name="qwen2.5-coder-0.5b-instruct")
    benign = [{"role": "user", "content": "How do I bake bread?"}]
    try:
        def ask(steering):
            r = s.client.chat.completions.create(model="x", messages=benign, max_tokens=16, temperature=0,
                                                 extra_body={"steering": steering})
            return r.choices[0].message.content, r.model_extra["steering"]

        adapted = api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=16, adapters=adapters,
                               n_threads=1)
        plain = api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=16, n_threads=1)
        assert adapted.text != plain.text
        text, summary = ask({"loras": ["refusal-ablate"], "gate": False})
        assert text == adapted.text and summary["applied"] == "none; LoRA 1 x refusal-ablate" and summary["gate"] is None
        text, summary = ask({"loras": ["refusal-ablate"]})  # the gate is on by default: a benign prompt, no steering
        assert text == plain.text and summary["gate"]["steer"] is False
        assert summary["applied"] == "none (the probe gate is off)"
        assert ask({"vectors": None, "gate": False})[0] == plain.text
        for steering, param in [({"loras": ["nope"]}, "steering.loras[0].name"),
                                ({"loras": "refusal-ablate"}, "steering.loras"),
                                ({"gate": "yes"}, "steering.gate"),
                                ({"instruction": "bread"}, "steering.instruction")]:
            r = s.post("/v1/chat/completions", {"messages": benign, "steering": steering})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    finally:
        s.close()
    r = Running(qwen05, slots=1, name="qwen2.5-coder-0.5b-instruct")  # no probe: asking for the gate is an error
    try:
        r2 = r.post("/v1/chat/completions", {"messages": benign, "steering": {"gate": True}})
        assert r2.status_code == 400 and "no probe" in r2.json()["error"]["message"]
    finally:
        r.close()


@pytest.mark.skipif(api.backend_devices() and any(n.startswith(("CUDA", "Metal", "MTL")) for n, _ in api.backend_devices()),
                    reason="llama.cpp's GPU kernels are not batch invariant: a row of several may differ from a lone row")
def test_batched_rows_each_with_its_own_vector_equal_alone(smol):
    """Batched mode: the next tokens of the requests steered by vectors alone go into one decode,
    each row with its own vector (and one unsteered); on the CPU every reply equals its lone
    `generate`. A request with rejection meanwhile runs in its own context, as before."""
    s = Running(smol, slots=4, batch=True)
    try:
        assert s.engine.batched
        specs = ["happy-sad:4", "happy-sad:-4", "uppercase", None]
        alone = [generate(smol, [x] if x else [], max_tokens=40).text for x in specs]
        rejected = generate(smol, ["happy-sad:8"], max_tokens=40, rejection=api.rejection_config(5)).text
        jobs = [{"vectors": [x] if x else None} for x in specs] + [{"vectors": ["happy-sad:8"], "reject": {"topk": 5}}]
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda st: chat(s, st, max_tokens=40).choices[0].message.content, jobs))
        assert got == alone + [rejected]
        assert s.engine.widest >= 3  # the rows did share decodes
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(s, jobs[0], max_tokens=40, stream=True)
                           if c.choices)
        assert streamed == alone[0]
    finally:
        s.close()


@pytest.mark.skipif(api.backend_devices() and any(n.startswith(("CUDA", "Metal", "MTL")) for n, _ in api.backend_devices()),
                    reason="llama.cpp's GPU kernels are not batch invariant: a row of several may differ from a lone row")
def test_auto_batches_only_as_many_rows_as_pay(smol, monkeypatch):
    """`--batch auto` on a machine where 2 rows cost more than 2 one-row decodes and 3 rows less
    than 3 (as measured on the AMD EPYC hosts): 2 requests arriving together run in their own
    contexts, 3 share one decode; each reply is what it is alone."""
    from localsteer import calibrate
    costs = calibrate.Costs(one=1.0, rows={2: 2.4, 3: 2.7}, joint=2.5)
    monkeypatch.setattr(calibrate, "costs", lambda *a, **k: costs)
    engine = server.Engine(smol, slots=3, queue=4, n_ctx=512, n_threads=1, batch="auto")
    try:
        assert engine.batched and engine.mode == "batched from 3 requests on, measured"
        index = server.vector_index(smol, "smollm2-135m-instruct")
        specs = ["happy-sad:4", "happy-sad:-4", None]
        alone = [generate(smol, [x] if x else [], max_tokens=24).text for x in specs]
        for n in (2, 3):
            engine.widest, ends, done = 0, {}, threading.Semaphore(0)

            def emit(i):
                def on(kind, payload):
                    if kind != "token":
                        ends[i] = (kind, payload)
                        done.release()
                return on

            with engine._wake:  # the engine takes them in one round
                for i, x in enumerate(specs[:n]):
                    body = {"max_tokens": 24, "temperature": 0, "steering": {"vectors": [x] if x else None}}
                    plan = server.plan(smol, body, api.chat_prompt(smol, ASK), index, server.Defaults(), 512)
                    engine.submit(server.Job(plan, emit(i), streamed=False))
            for _ in range(n):
                assert done.acquire(timeout=60)
            assert [ends[i][1]["text"] for i in range(n)] == alone[:n]
            assert engine.widest == (0 if n == 2 else 3)
    finally:
        engine.close()


def test_a_stop_string_ends_the_reply_before_it(smol, srv):
    """Greedy SmolLM2 answers "I'm so glad you're enjoying ...": the stops are cut from it."""
    want = generate(smol, [], max_tokens=24).text
    for stop in (want.split()[3], "glad you're enjoying"):  # one word; the second spans several tokens
        got = chat(srv, max_tokens=24, stop=[stop])
        assert got.choices[0].message.content == want[:want.index(stop)], stop
        assert got.choices[0].finish_reason == "stop"
        chunks = list(chat(srv, max_tokens=24, stop=["nowhere", stop], stream=True))
        # streamed: never a part of the stop string, though it arrives a token at a time
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want[:want.index(stop)]
    assert "glad you're enjoying" in want


def test_the_engine_outlives_a_request_whose_side_is_gone(smol):
    """A request whose event loop closed (the server stopping mid-reply) makes its emit raise:
    the engine drops it and serves the next one."""
    engine = server.Engine(smol, slots=1, queue=2, n_ctx=512, n_threads=1, batch=False)
    try:
        index = server.vector_index(smol, "smollm2-135m-instruct")
        plan = server.plan(smol, {"max_tokens": 8, "temperature": 0}, api.chat_prompt(smol, ASK), index,
                           server.Defaults(), 512)

        def gone(kind, payload):
            raise RuntimeError("Event loop is closed")

        done, ends = threading.Event(), []

        def fine(kind, payload):
            if kind != "token":
                ends.append((kind, payload))
                done.set()

        engine.submit(server.Job(plan, gone, streamed=True))
        engine.submit(server.Job(plan, fine, streamed=True))
        assert done.wait(60) and ends[0][0] == "end" and ends[0][1]["completion_tokens"] == 8
        assert engine._thread.is_alive()
    finally:
        engine.close()
