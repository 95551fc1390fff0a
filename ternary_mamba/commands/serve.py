"""`ternary-mamba serve MODEL`: an OpenAI-compatible HTTP API over any model the package loads (packed ternary
folders, GGUF files, runs, full-precision folders), as llama.cpp's server offers:

    GET  /v1/models            the one model served
    POST /v1/completions       {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions  {"messages": [{"role", "content"}], ...}  (a base model: the turns as plain text)
    GET  /health               {"status": "ok", "waiting": N, "decoding": M}

Requests are decoded together: `runtime.batching.BatchedGenerator` prefills each prompt, then advances every
running request with one decode-engine step (up to --max-batch rows); more requests wait in a bounded queue
(--max-queue; beyond it: HTTP 503).  "stream": true sends server-sent events ending in `data: [DONE]`; a client
that disconnects frees its row at the next step.  Errors are JSON bodies in OpenAI's shape.  Built on FastAPI
and uvicorn (the `serve` extra: pip install 'ternary-mamba[serve]'); Ctrl-C / SIGTERM shut down gracefully."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from ..errors import UserError
from ..ops.device import precision
from ..runtime.batching import BatchedGenerator, QueueFull
from ..runtime.load import load_for_decoding
from .flags import require
from ..log import say

MAX_BODY = 1_000_000
MAX_PROMPT_TOKENS = 32_768


class BadRequest(Exception):
    pass


class Engine:
    """The model, its tokenizer and the batching decoder behind the HTTP routes."""

    def __init__(self, cfg):
        self.device, self.dtype = precision(cfg.device, "fp32")
        self.model, self.tok, self.note = load_for_decoding(cfg.model, cfg.tokenizer)
        self.model = self.model.to(self.device).eval()
        self.mode = None
        if not (cfg.int8_head or cfg.a8):
            from ..runtime.modes import select_mode
            self.mode = select_mode(self.model, cfg.model, "exact" if cfg.exact else cfg.mode)
        if cfg.int8_head:
            from ..runtime.heads import use_int8_head
            use_int8_head(self.model)
        if cfg.a8:
            from ..runtime.packed_linear import use_a8_activations
            use_a8_activations(self.model)
        self.name = str(cfg.model)
        self.limit = cfg.max_tokens_limit
        self.gen = BatchedGenerator(self.model, self.tok.eos_id, cfg.max_batch, cfg.max_queue)

    def start(self, prompt: str, body: dict):
        """Validate the request and queue it: (request, stop strings, prompt tokens)."""
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
        if len(ids) > MAX_PROMPT_TOKENS:
            raise BadRequest(f"the prompt is {len(ids)} tokens; at most {MAX_PROMPT_TOKENS}")
        return self.gen.submit(ids, max_tokens, temperature, top_p, seed), stop, len(ids)

    async def pieces(self, req, stop: list[str]):
        """Text pieces as they decode (complete UTF-8 only, cut at a stop string); the request is cancelled
        when the consumer stops early (a client that went away)."""
        out: list[int] = []
        shown, reason = "", None
        try:
            while True:
                toks = await asyncio.to_thread(req.get_ready)
                if toks is None:
                    break
                out += toks
                text = self.tok.decode(out)
                hit = next((text.index(s) for s in stop if s in text), None)
                if hit is not None:
                    text, reason = text[:hit], "stop"
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
                if reason == "stop":
                    break
        finally:
            req.cancel()
        yield ("finish", reason or req.finish_reason or "length", len(out))


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


def _error(code: int, msg: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": msg, "type": kind, "code": code}}, status_code=code)


def make_app(engine: Engine):
    """The FastAPI application over `engine` (its routes are the module docstring's)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UserError("serve needs FastAPI and uvicorn: pip install 'ternary-mamba[serve]'") from None
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.gen.close()                    # graceful shutdown: running requests end, the worker stops

    app = FastAPI(title="ternary-mamba", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):      # 404 / 405 in OpenAI's error shape
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": len(engine.gen._pending), "decoding": len(engine.gen._active)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "ternary-mamba"}]}

    async def complete(request, chat: bool):
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY:
                raise BadRequest(f"the body must be JSON of at most {MAX_BODY} bytes")
            raw = await request.body()
            if not 0 < len(raw) <= MAX_BODY:
                raise BadRequest(f"the body must be JSON of at most {MAX_BODY} bytes")
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            if chat:
                prompt = chat_prompt(body.get("messages"))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise BadRequest("\"prompt\" must be a string")
            req, stop, n_prompt = engine.start(prompt, body)
        except QueueFull as e:
            return _error(503, str(e), "server_busy")
        except (BadRequest, UserError) as e:
            return _error(400, str(e))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
            return _error(400, f"not valid JSON ({str(e)[:100]})")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, final: bool = False) -> dict:
            if chat and final:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if body.get("stream"):
            async def events():
                async for piece in engine.pieces(req, stop):
                    c = choice(None, piece[1]) if isinstance(piece, tuple) else choice(piece, None)
                    obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                           "model": engine.name, "choices": [c]}
                    yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, fin = "", ("finish", "length", 0)
        try:
            async for piece in engine.pieces(req, stop):
                if isinstance(piece, tuple):
                    fin = piece
                else:
                    text += piece
        except UserError as e:
            return _error(500, str(e), "server_error")
        return {"id": rid, "object": kind, "created": created, "model": engine.name,
                "choices": [choice(text, fin[1], final=True)],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": fin[2], "total_tokens": n_prompt + fin[2]}}

    async def completions(request):
        return await complete(request, chat=False)

    async def chat_completions(request):
        return await complete(request, chat=True)

    for path, route in (("/v1/completions", completions), ("/v1/chat/completions", chat_completions)):
        route.__annotations__ = {"request": Request}   # the class itself: this module's annotations are strings
        app.add_api_route(path, route, methods=["POST"])
    return app


class Server:
    """A running server (uvicorn in a thread of this process): what tests and `bench serve` start."""

    def __init__(self, cfg):
        require(cfg, "model", command="serve")
        try:
            import uvicorn
        except ImportError:
            raise UserError("serve needs FastAPI and uvicorn: pip install 'ternary-mamba[serve]'") from None
        import socket
        self.engine = Engine(cfg)
        self.app = make_app(self.engine)
        try:
            self.sock = socket.create_server((cfg.host, cfg.port))
        except OSError as e:
            raise UserError(f"{cfg.host}:{cfg.port}: cannot listen ({e.strerror})") from None
        self.host, self.port = self.sock.getsockname()[:2]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT / SIGTERM (uvicorn's handlers: stop accepting, finish what runs, close)."""
        self.uvicorn.run(sockets=[self.sock])

    def start_in_thread(self) -> "Server":
        import threading
        self.uvicorn.config.install_signal_handlers = False   # not the main thread
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if getattr(self, "_thread", None):
            self._thread.join(30)
        self.engine.gen.close()
        self.sock.close()


def serve(cfg) -> None:
    """`ternary-mamba serve` (cfg: commands.tool_configs.ServeConfig): runs until interrupted."""
    server = Server(cfg)
    say(f"serving {cfg.model} at {server.url}/v1 (OpenAI-compatible: /v1/completions, /v1/chat/completions, "
        f"/v1/models; up to {cfg.max_batch} requests decoded together, {cfg.max_queue} waiting); Ctrl-C stops it",
        flush=True)
    if server.engine.note:
        say(server.engine.note, flush=True)
    if server.engine.mode:
        say(f"decode mode: {server.engine.mode}", flush=True)
    try:
        server.run()
    finally:
        server.engine.gen.close()
        server.sock.close()
