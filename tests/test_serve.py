"""`serve`: the OpenAI-compatible API over the bundled teacher, on an ephemeral port, in this process."""
import json
import threading
import urllib.error
import urllib.request

import pytest

from ternary_mamba.commands.configs import GenerateConfig
from ternary_mamba.commands.generate import generate
from ternary_mamba.commands.serve import make_server
from ternary_mamba.commands.tool_configs import ServeConfig


@pytest.fixture(scope="module")
def url():
    server = make_server(ServeConfig(model="bundled", port=0))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_and_health(url):
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == "bundled"
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_a_greedy_completion_equals_generate_and_streams_the_same_text(url):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    code, text = _post(url, "/v1/completions", body)
    assert code == 200
    r = json.loads(text)
    got = r["choices"][0]["text"]
    assert got == generate(GenerateConfig(model="bundled", prompt="Once upon a time", max_new_tokens=12, temperature=0))
    assert r["usage"]["completion_tokens"] <= 12 and r["choices"][0]["finish_reason"] in ("length", "stop")
    code, sse = _post(url, "/v1/completions", {**body, "stream": True})
    events = [line[6:] for line in sse.splitlines() if line.startswith("data: ")]
    assert code == 200 and events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == got


def test_chat_and_stop_strings(url):
    code, text = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}],
                                                     "max_tokens": 20, "temperature": 0, "stop": ["."]})
    r = json.loads(text)
    msg = r["choices"][0]["message"]
    assert code == 200 and msg["role"] == "assistant" and "." not in msg["content"]


@pytest.mark.parametrize("body,raw,msg", [({"prompt": "x", "max_tokens": 10 ** 9}, None, "max_tokens"),
                                          ({"prompt": "x", "temperature": "hot"}, None, "temperature"),
                                          ({"max_tokens": 3}, None, "prompt"),
                                          ({"messages": []}, None, "messages"),
                                          (None, b"{not json", "not valid JSON")])
def test_a_bad_request_is_a_400_with_a_reason(url, body, raw, msg):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    code, text = _post(url, path, body, raw)
    assert code == 400 and msg in json.loads(text)["error"]["message"]
