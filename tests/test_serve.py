"""``finetune serve`` end to end: a server the test launches on a free localhost port, with a tiny random model
and two LoRA adapters made in the test, queried through the official ``openai`` client and through raw HTTP.

Greedy (temperature 0), fp32: requests for different adapters sent together, decoded in one continuously batched
loop (``--max-batch 3``, so some wait and join mid-way), return exactly the text and token counts each gives
when sent alone. Bad input gets 404/400 with a message and leaves the server serving; a client that disconnects
mid-stream is cancelled and its slot freed.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tiny_model_dir import make_model_dir  # noqa: E402

REQUESTS = [  # (model, prompt, max_tokens): base and both adapters, several lengths
    ("a", "The list", 12), ("b", "The list", 7), ("model", "The list", 9),
    ("b", "Names are bound", 15), ("a", "x", 3), ("model", "A class is", 11),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(model_dir, out, r, seed, hidden=None):
    from finetune_ref import lora
    from finetune_ref.models.loader import load_model

    torch.manual_seed(seed)
    model = load_model(model_dir)
    lora.inject_lora(model, lora.LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].weight.mul_(20)  # large enough to change the greedy tokens
    return lora.save_adapter(model, out)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, _ = make_model_dir(root)
    adapters = {"a": make_adapter(model_dir, root / "a", 2, 1), "b": make_adapter(model_dir, root / "b", 4, 2)}
    other_dir, _ = make_model_dir(tmp_path_factory.mktemp("other"), hidden=48)
    adapters["other_base"] = make_adapter(other_dir, root / "other_adapter", 2, 3)
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finetune_ref", "serve", "--model", str(model_dir),
                             "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                             "--port", str(port), "--max-batch", "3", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={"OMP_NUM_THREADS": "1", **_env()})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (root / "server.log").read_text()
        assert time.time() < deadline, "the server did not start in 180 s"
        time.sleep(0.5)
    yield url, adapters
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _env():
    import os

    return dict(os.environ)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(url, model, prompt, max_tokens, chat=False):
    c = client(url)
    if chat:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                      max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    r = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def together(fn, jobs):
    """Run fn(*job) for every job on its own thread, released at the same moment."""
    barrier = threading.Barrier(len(jobs))

    def go(job):
        barrier.wait()
        return fn(*job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(go, jobs))


def test_models_lists_the_base_and_each_adapter(server):
    url, _ = server
    ids = [m.id for m in client(url).models.list().data]
    assert ids == ["model", "a", "b"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_concurrent_mixed_adapter_requests_equal_each_alone(server, chat):
    url, _ = server
    jobs = [(url, m, p, n, chat) for m, p, n in REQUESTS]
    concurrent = together(complete, jobs)
    alone = [complete(*job) for job in jobs]
    assert concurrent == alone
    by_model = {m: text for (m, _, _), (text, _, _) in zip(REQUESTS, alone) if m != "model"}
    assert len({alone[0][0], alone[1][0], alone[2][0]}) == 3  # same prompt, three models, three answers
    assert by_model  # (the adapters are loaded and used)
    for (_, _, n), (_, reason, tokens) in zip(REQUESTS, alone):
        assert reason == "stop" or (reason == "length" and tokens == n)


def stream(url, model, prompt, max_tokens):
    """Raw HTTP + server-sent events: the concatenated deltas, the finish reason and the usage chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, reason, used, done = "", None, None, False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
            else:
                used = chunk["usage"]["completion_tokens"]
    assert done
    return text, reason, used


def test_concurrent_streams_over_raw_http_equal_each_alone(server):
    url, _ = server
    jobs = [(url, m, p, n) for m, p, n in REQUESTS]
    streamed = together(stream, jobs)
    alone = [complete(url, m, p, n) for m, p, n in REQUESTS]
    assert streamed == alone


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "prompt": "x"}, 404, "`nope` does not exist"),
    ({"prompt": [5] * 2100}, 400, "maximum context length is 2048"),
    ({"prompt": "x", "max_tokens": 2048}, 400, "maximum context length"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n:"),
    ({"prompt": "x", "echo": True}, 400, "echo is not supported"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": [100000]}, 400, "token ids"),
    ({}, 400, "prompt"),
])
def test_bad_requests_are_answered_with_a_message(server, body, status, message):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert complete(url, "a", "x", 2)[2] >= 1  # still serving


def test_malformed_json_and_openai_client_errors(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client(url).completions.create(model="a", prompt="x", top_p=1.5)


def test_load_and_unload_adapters_at_run_time(server, tmp_path):
    url, adapters = server
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    for path, message in ((tmp_path / "missing", "not a directory"), (corrupt, "not a readable safetensors"),
                          (adapters["other_base"], "another base model")):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(path)}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert "c" not in [m.id for m in client(url).models.list().data]  # nothing loaded
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["a"])}, timeout=60)
    assert r.status_code == 200, r.text
    assert [m.id for m in client(url).models.list().data] == ["model", "a", "b", "c"]
    assert complete(url, "c", "The list", 6) == complete(url, "a", "The list", 6)  # same weights, same tokens
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["a"])}, timeout=60)
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}, timeout=60).status_code == 200
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}, timeout=60)
    assert r.status_code == 404 and "'c'" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"model": "c", "prompt": "x"}, timeout=60).status_code == 404


def wait_until_cancelled(url: str, before: int) -> None:
    """Until the server has counted a cancellation more than ``before`` and runs no row (at most 60 s)."""
    deadline = time.time() + 60
    while True:
        stats = httpx.get(f"{url}/health").json()
        if stats["cancelled"] > before and stats["running"] == 0:
            return
        assert time.time() < deadline, stats
        time.sleep(0.2)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, _ = server
    before = httpx.get(f"{url}/health").json()["cancelled"]
    body = {"model": "b", "prompt": "The list", "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    wait_until_cancelled(url, before)
    assert complete(url, "a", "x", 2)[2] >= 1


def test_nf4_base_in_process(server, tmp_path):
    """``--quantize nf4``'s loader and the app without a socket (Starlette's TestClient runs the lifespan)."""
    from fastapi.testclient import TestClient

    from finetune_ref.models.batching import Row, generate_batch
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.qlora.nf4_linear import NF4Linear
    from finetune_ref.recipes.inference import load_inference_model
    from finetune_ref.serve.app import build_app
    from finetune_ref.serve.engine import Engine

    _, adapters = server
    model_dir = adapters["a"].parent / "model"
    model = load_inference_model(model_dir, None, [adapters["a"], adapters["b"]], adapter_names=["a", "b"],
                                 quantize="nf4")
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    tokenizer = Tokenizer.from_dir(model_dir)
    with TestClient(build_app(Engine(model, tokenizer, "model", max_batch=2))) as c:
        got = [c.post("/v1/completions", json={"model": m, "prompt": "The list", "max_tokens": 6,
                                                "temperature": 0}).json()["choices"][0]["text"] for m in ("a", "b")]
    from finetune_ref import lora
    from finetune_ref.lora.mixed import clear_row_adapters

    clear_row_adapters(model)  # the engine left its last batch's row adapters on the layers
    want = []
    for name in ("a", "b"):
        lora.set_adapter(model, name)
        row = Row(tokenizer.encode("The list"), max_new_tokens=6,
                  stop_ids=frozenset({tokenizer.eos_token_id}))
        want.append(generate_batch(model, [row], decode=tokenizer.decode)[0].text)
    assert got == want and got[0] != got[1]


def test_an_exception_in_a_step_fails_that_batch_only(server):
    from fastapi.testclient import TestClient

    from finetune_ref.models.loader import load_model
    from finetune_ref.models.tokenizer import Tokenizer
    from finetune_ref.serve.app import build_app
    from finetune_ref.serve.engine import Engine

    _, adapters = server
    model_dir = adapters["a"].parent / "model"
    engine = Engine(load_model(model_dir), Tokenizer.from_dir(model_dir), "model", max_batch=2)
    calls = {"n": 0}
    real_add = engine.batch.add

    def add_once_broken(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_add(rows)

    engine.batch.add = add_once_broken
    with TestClient(build_app(engine)) as c:
        body = {"prompt": "The list", "max_tokens": 4, "temperature": 0}
        failed = c.post("/v1/completions", json=body)
        assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
        ok = c.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert c.get("/health").json()["failed"] == 1


def test_a_client_that_gives_up_waiting_frees_its_slot(server):
    url, _ = server
    before = httpx.get(f"{url}/health").json()["cancelled"]
    body = {"model": "a", "prompt": "The list", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)  # not streamed: hangs up after 1 s
    wait_until_cancelled(url, before)


def test_a_long_request_does_not_hold_back_a_short_one(server):
    url, _ = server
    body = {"model": "b", "prompt": "The list", "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as long_request:
        lines = long_request.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long request is decoding
        text, reason, tokens = complete(url, "a", "x", 3)  # joins the running batch, leaves it when done
        assert reason == "stop" or tokens == 3
        chunk = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
        assert chunk["choices"][0]["finish_reason"] is None  # the long one is still going
