"""`ternary-mamba serve MODEL`: an OpenAI-compatible HTTP API over any model the package loads (packed ternary
folders, GGUF files, runs, full-precision folders), as llama.cpp's server offers:

    GET  /v1/models            the one model served
    POST /v1/completions       {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], ...}  (a base model: the turns as plain text)
    GET  /health

Requests run one at a time (one model, one decode state); "stream": true sends server-sent events ending in
`data: [DONE]`.  Standard library only (http.server); a bad request is a 400 with an OpenAI-style error body."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import UserError
from ..ops.device import autocast, precision
from ..runtime.generate import generate_ids
from ..runtime.load import load_model_and_tokenizer
from .flags import require
from ..log import say

MAX_BODY = 1_000_000


class BadRequest(Exception):
    pass


class Engine:
    """The model, its tokenizer and the lock that serialises generation."""

    def __init__(self, cfg):
        self.device, self.dtype = precision(cfg.device, "fp32")
        self.model, self.tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer)
        self.model = self.model.to(self.device)
        if cfg.int8_head:
            from ..runtime.heads import use_int8_head
            use_int8_head(self.model)
        if cfg.a8:
            from ..runtime.packed_linear import use_a8_activations
            use_a8_activations(self.model)
        self.name = str(cfg.model)
        self.limit = cfg.max_tokens_limit
        self.lock = threading.Lock()

    def complete(self, prompt: str, body: dict):
        """Yields text pieces as they decode; ends with a ("finish", reason, prompt_tokens, completion_tokens)."""
        max_tokens = _int(body, "max_tokens", 16, 1, self.limit)
        temperature = _num(body, "temperature", 1.0, 0.0, 10.0)
        top_p = _num(body, "top_p", 1.0, 1e-6, 1.0)
        seed = _int(body, "seed", 0, 0, 2 ** 62)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise BadRequest("\"stop\" must be a string or a list of up to 4 non-empty strings")
        ids = self.tok.encode(prompt)
        if not ids:
            raise BadRequest("the prompt encodes to no tokens")
        out: list[int] = []
        shown, reason = "", "length"
        with self.lock, autocast(self.device, self.dtype):
            for t in generate_ids(self.model, ids, max_tokens, temperature, top_p, seed, self.tok.eos_id):
                out.append(t)
                text = self.tok.decode(out)
                hit = next((text.index(s) for s in stop if s in text), None)
                if hit is not None:
                    text, reason = text[:hit], "stop"
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
                if reason == "stop":
                    break
            else:
                if len(out) < max_tokens:
                    reason = "stop"            # the end-of-text token
        yield ("finish", reason, len(ids), len(out))


def _num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"\"{key}\" must be a number in [{lo}, {hi}]")
    return float(v)


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"\"{key}\" must be an integer in [{lo}, {hi}]")
    return v


def chat_prompt(messages) -> str:
    """A base model has no chat template: the turns as plain text, then the assistant's turn to continue."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("\"messages\" must be a non-empty list")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a string \"role\" and \"content\"")
        lines.append(f"{m['role'].capitalize()}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:"


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        server_version = "ternary-mamba"

        def log_message(self, fmt, *args):          # one line per request on stderr, as servers do
            pass

        def _json(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str) -> None:
            self._json(code, {"error": {"message": msg, "type": "invalid_request_error", "code": code}})

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": engine.name, "object": "model",
                                                                    "owned_by": "ternary-mamba"}]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self._error(404, f"no route {self.path}")
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if not 0 < n <= MAX_BODY:
                    raise BadRequest(f"the body must be JSON of at most {MAX_BODY} bytes")
                body = json.loads(self.rfile.read(n))
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                chat = self.path.endswith("chat/completions")
                if chat:
                    prompt = chat_prompt(body.get("messages"))
                else:
                    prompt = body.get("prompt")
                    if isinstance(prompt, list) and len(prompt) == 1:
                        prompt = prompt[0]
                    if not isinstance(prompt, str):
                        raise BadRequest("\"prompt\" must be a string")
                pieces = engine.complete(prompt, body)
                first = next(pieces)              # validation errors surface before any byte is sent
            except (BadRequest, json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                return self._error(400, str(e) if isinstance(e, BadRequest) else f"not valid JSON ({e})")
            except UserError as e:
                return self._error(400, str(e))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    for piece in _chain(first, pieces):
                        if isinstance(piece, tuple):
                            choice = ({"index": 0, "delta": {}, "finish_reason": piece[1]} if chat else
                                      {"index": 0, "text": "", "finish_reason": piece[1]})
                        else:
                            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                                      else {"index": 0, "text": piece, "finish_reason": None})
                        obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                               "model": engine.name, "choices": [choice]}
                        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):   # the client left: free the model for the next
                    pieces.close()
                return
            text, fin = "", ("finish", "length", 0, 0)
            for piece in _chain(first, pieces):
                if isinstance(piece, tuple):
                    fin = piece
                else:
                    text += piece
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fin[1]}
                      if chat else {"index": 0, "text": text, "finish_reason": fin[1], "logprobs": None})
            self._json(200, {"id": rid, "object": kind, "created": created, "model": engine.name,
                             "choices": [choice], "usage": {"prompt_tokens": fin[2], "completion_tokens": fin[3],
                                                            "total_tokens": fin[2] + fin[3]}})
    return Handler


def _chain(first, rest):
    yield first
    yield from rest


def make_server(cfg) -> ThreadingHTTPServer:
    """The server, bound and ready (`serve_forever()` runs it); `server.server_address` says where."""
    require(cfg, "model", command="serve")
    engine = Engine(cfg)
    try:
        return ThreadingHTTPServer((cfg.host, cfg.port), make_handler(engine))
    except OSError as e:
        raise UserError(f"{cfg.host}:{cfg.port}: cannot listen ({e.strerror})") from None


def serve(cfg) -> None:
    """`ternary-mamba serve` (cfg: commands.tool_configs.ServeConfig): runs until interrupted."""
    server = make_server(cfg)
    host, port = server.server_address[:2]
    say(f"serving {cfg.model} at http://{host}:{port}/v1 (OpenAI-compatible: /v1/completions, "
          f"/v1/chat/completions, /v1/models); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
