"""`serve`: the OpenAI-compatible API over the bundled teacher, on an ephemeral loopback port in this process,
spoken to by the official `openai` client: completions, streaming, chat, concurrent requests decoded together,
cancellation, bad requests, a full queue."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from ternary_mamba.commands.configs import GenerateConfig  # noqa: E402
from ternary_mamba.commands.generate import generate  # noqa: E402
from ternary_mamba.commands.serve import Server  # noqa: E402
from ternary_mamba.commands.tool_configs import ServeConfig  # noqa: E402

PROMPTS = ["Once upon a time", "The king said", "It was a dark and stormy night", "Alice was", "In the morning",
           "She looked at him and"]


@pytest.fixture(scope="module")
def server():
    s = Server(ServeConfig(model="bundled", port=0, max_batch=4, max_queue=16)).start_in_thread()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(prompt: str, n: int) -> str:
    return generate(GenerateConfig(model="bundled", prompt=prompt, max_new_tokens=n, temperature=0))


def _ask_together(client, model: str, prompts, max_tokens: int) -> dict:
    """Every prompt sent at once, each from its own thread (greedy); {prompt: text}, or the first error raised."""
    got, errors = {}, []

    def ask(p):
        try:
            got[p] = client.completions.create(model=model, prompt=p, max_tokens=max_tokens,
                                               temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["bundled"]
    assert _get(server.url + "/health")["status"] == "ok"


def test_a_greedy_completion_equals_generate_and_streams_the_same_text(client):
    r = client.completions.create(model="bundled", prompt="Once upon a time", max_tokens=12, temperature=0)
    got = r.choices[0].text
    assert got == _greedy("Once upon a time", 12)
    assert r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="bundled", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == got
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_streaming_and_stop_strings(client):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="bundled", messages=msgs, max_tokens=20, temperature=0, stop=["."])
    msg = r.choices[0].message
    assert msg.role == "assistant" and "." not in msg.content
    stream = client.chat.completions.create(model="bundled", messages=msgs, max_tokens=20, temperature=0, stop=["."],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.content


def test_concurrent_requests_are_decoded_together_and_each_gets_its_own_tokens(server, client):
    want = {p: _greedy(p, 16) for p in PROMPTS}
    steps0, rows0 = server.engine.gen.steps, server.engine.gen.rows
    assert _ask_together(client, "bundled", want, 16) == want
    steps, rows = server.engine.gen.steps - steps0, server.engine.gen.rows - rows0
    assert rows / steps > 1.5, (steps, rows)        # several rows per decode step: batched, not one at a time


def test_a_client_that_goes_away_frees_its_place(server, client):
    stream = client.completions.create(model="bundled", prompt="A long story:", max_tokens=2000, temperature=1.0,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()                                   # the client disconnects mid-generation
    deadline = time.time() + 30
    while _get(server.url + "/health")["decoding"] and time.time() < deadline:
        time.sleep(0.05)
    assert _get(server.url + "/health")["decoding"] == 0
    assert client.completions.create(model="bundled", prompt="Hi", max_tokens=3).choices[0].text is not None


@pytest.mark.parametrize("kwargs,msg", [(dict(prompt="x", max_tokens=10 ** 9), "max_tokens"),
                                        (dict(prompt="x", temperature=99), "temperature"),
                                        (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop")])
def test_a_bad_request_is_a_400_with_a_reason(client, kwargs, msg):
    with pytest.raises(openai.BadRequestError, match=msg):
        client.completions.create(model="bundled", **kwargs)


@pytest.mark.parametrize("path,raw,code,msg", [("/v1/completions", b"{not json", 400, "not valid JSON"),
                                               ("/v1/completions", b"[1, 2]", 400, "JSON object"),
                                               ("/v1/completions", b'{"max_tokens": 3}', 400, "prompt"),
                                               ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
                                               ("/v1/nothing", b"{}", 404, "Not Found")])
def test_malformed_bodies_and_routes_get_json_errors(server, path, raw, code, msg):
    req = urllib.request.Request(server.url + path, data=raw, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == code and msg in json.loads(e.value.read())["error"]["message"]


def test_a_full_queue_is_refused_not_grown():
    import torch
    from ternary_mamba.runtime.batching import BatchedGenerator, QueueFull
    from ternary_mamba.runtime.load import load_model_and_tokenizer
    m, tok = load_model_and_tokenizer("bundled", None)
    gen = BatchedGenerator(m.eval(), tok.eos_id, max_batch=1, max_queue=2)
    with gen._cv:                                    # the worker cannot take any while we hold its lock
        reqs = [gen.submit([1, 2, 3], 4, 0.0) for _ in range(2)]
        with pytest.raises(QueueFull, match="waiting already"):
            gen.submit([1, 2, 3], 4, 0.0)
    with torch.no_grad():
        assert [len(list(r)) <= 4 for r in reqs] == [True, True]
    gen.close()
    assert all(r.finish_reason in ("length", "stop") for r in reqs)


def test_a_sampled_completion_equals_generate_with_the_same_seed(client):
    """Rows are sampled with their own generator (one uniform draw each): sharing decode steps with other
    requests does not change a request's tokens."""
    r = client.completions.create(model="bundled", prompt="The sea", max_tokens=10, temperature=0.9, top_p=0.8, seed=7)
    want = generate(GenerateConfig(model="bundled", prompt="The sea", max_new_tokens=10, temperature=0.9, top_p=0.8,
                                   seed=7))
    assert r.choices[0].text == want


def test_sample_rows_are_independent_of_their_neighbours():
    import torch
    from ternary_mamba.runtime.generate import sample_rows
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]   # noqa: E731
    together = sample_rows(logits, [1.0, 0.0, 0.7], [1.0, 1.0, 0.9], gens())
    alone = [sample_rows(logits[i:i + 1], [t], [p], [g])[0] for i, (t, p, g) in
             enumerate(zip([1.0, 0.0, 0.7], [1.0, 1.0, 0.9], gens()))]
    assert together.tolist() == [int(a) for a in alone] and together[1] == logits[1].argmax()


def test_a_packed_model_serves_in_its_fast_mode_batched_like_generate(tmp_path):
    """--mode fast (int8 activations, 4-bit head, bf16 SSM state): requests decoded together get exactly the tokens
    `generate --mode fast` gives each alone (a joining request's fp32 prefill state is rounded into the batch's bf16
    state), and the server says which mode it runs."""
    from ternary_mamba.commands.export import export
    from ternary_mamba.commands.configs import ExportConfig
    export(ExportConfig(model="bundled", out=str(tmp_path / "p"), group_size=128, cost_tokens=16))
    packed = str(tmp_path / "p")
    want = {p: generate(GenerateConfig(model=packed, prompt=p, max_new_tokens=12, temperature=0, mode="fast"))
            for p in PROMPTS[:3]}
    s = Server(ServeConfig(model=packed, port=0, max_batch=4, max_queue=8, mode="fast")).start_in_thread()
    try:
        assert s.engine.mode.startswith("fast")
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert _ask_together(c, "x", want, 12) == want
    finally:
        s.stop()
