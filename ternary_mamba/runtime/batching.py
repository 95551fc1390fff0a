"""Continuous batching for serving: many generation requests decoded together, joining and leaving between steps.

One worker thread owns the model.  A request is prefilled alone (the chunked scan over its prompt, batch 1),
then joins the running batch: its recurrent state (conv + SSM, O(1) in the prompt length) becomes one more row
of the batch's state, and every decode step advances all rows with one call of the decode engine
(`decode_engine.step`: the whole model in C for up to DECODE_MAX_BATCH rows, else the module path).  A request
leaves when it reaches its token limit or the end-of-text token, or is cancelled (a client that went away);
its row is dropped from the state.  Each request samples with its own generator, so its tokens do not depend on
which other requests shared its steps (up to the kernels' summation order for different batch sizes).

    gen = BatchedGenerator(model, eos_id, max_batch=8, max_queue=64)
    req = gen.submit(prompt_ids, max_tokens=32, temperature=0.0)
    for token in req: ...            # blocks until each token is decoded
    gen.close()
"""
from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..core.model import LayerState
from ..errors import UserError
from ..log import logger
from ..ops.device import module_device
from ..spec import DECODE_MAX_BATCH
from . import decode_engine
from .generate import sample_next, sample_rows

_END = object()


class QueueFull(UserError):
    """More requests are waiting than the server accepts: try again later (HTTP 503)."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # "length", "stop" (end of text) or "cancelled"
    error: BaseException | None = None
    _out: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this request (its row leaves the batch at the next step)."""
        self._cancelled.set()

    def get(self, timeout: float | None = None):
        """The next token id, or None once the request has finished (see finish_reason); re-raises a failure."""
        item = self._out.get(timeout=timeout)
        if item is _END:
            self._out.put(_END)              # later calls see the end too
            if self.error is not None:
                raise self.error
            return None
        return item

    def get_ready(self, timeout: float | None = None) -> list[int] | None:
        """Every token decoded so far and not yet taken (waits for at least one), or None once finished: one
        wake-up per batch of tokens for a consumer slower than the decoder."""
        first = self.get(timeout)
        if first is None:
            return None
        out = [first]
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return out
            if item is _END:
                self._out.put(_END)
                return out
            out.append(item)

    def __iter__(self):
        while (t := self.get()) is not None:
            yield t


class BatchedGenerator:
    """The worker: a bounded queue of waiting requests and a batch of at most `max_batch` decoding ones."""

    def __init__(self, model, eos_id: int | None, max_batch: int = 8, max_queue: int = 64):
        if not 1 <= max_batch <= DECODE_MAX_BATCH:
            raise UserError(f"max_batch {max_batch}: must be in [1, {DECODE_MAX_BATCH}]")
        if max_queue < 1:
            raise UserError(f"max_queue {max_queue}: must be >= 1")
        self.model, self.eos_id, self.max_batch, self.max_queue = model, eos_id, max_batch, max_queue
        self.vocab = model.config.vocab_size
        self.device = module_device(model)
        self._pending: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._gens: dict[int, torch.Generator] = {}
        self._last: dict[int, int] = {}
        self._state: list[LayerState] | None = None
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0                         # decode steps run, and rows they advanced (batching at work)
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="ternary-mamba-decode", daemon=True)
        self._thread.start()

    # ---- the callers' side --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               seed: int = 0) -> Request:
        if not prompt_ids:
            raise UserError("the prompt encodes to no tokens")
        req = Request(list(prompt_ids), max_tokens, temperature, top_p, seed)
        with self._cv:
            if self._closed:
                raise UserError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (--max-queue {self.max_queue}); "
                                "try again shortly")
            self._pending.append(req)
            self._cv.notify()
        return req

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is waiting or running and stop the worker (graceful shutdown)."""
        with self._cv:
            self._closed = True
            for r in list(self._pending) + self._active:
                r.cancel()
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the worker -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._active and not self._closed:
                    self._cv.wait()
                if self._closed and not self._active:
                    for r in self._pending:
                        self._finish(r, "cancelled")
                    self._pending.clear()
                    return
                joining = []
                while self._pending and len(self._active) + len(joining) < self.max_batch:
                    joining.append(self._pending.popleft())
            try:
                with torch.no_grad():
                    for r in joining:
                        self._prefill(r)
                    if self._active:
                        self._step()
            except Exception as e:   # noqa: BLE001 - a failure ends the requests it touched, not the server
                logger.error("decode step failed: %s", e)
                for r in joining + self._active:
                    r.error = e if isinstance(e, UserError) else UserError(f"generation failed ({type(e).__name__}: {e})")
                    self._finish(r, "error")
                self._active, self._state = [], None

    def _prefill(self, r: Request) -> None:
        if r._cancelled.is_set():
            return self._finish(r, "cancelled")
        gen = torch.Generator().manual_seed(r.seed)
        logits, state = self.model(torch.tensor([r.prompt_ids], device=self.device), return_state=True,
                                   last_only=True)
        tok = int(sample_next(logits[:, -1, :self.vocab], r.temperature, r.top_p, gen)[0])
        if self._emit(r, tok):
            return
        self._gens[id(r)], self._last[id(r)] = gen, tok
        self._active.append(r)
        state = [LayerState(s.conv.float().contiguous(), s.ssm.float().contiguous()) for s in state]
        self._state = state if self._state is None else [
            LayerState(torch.cat([a.conv, b.conv]), torch.cat([a.ssm, b.ssm])) for a, b in zip(self._state, state)]

    def _step(self) -> None:
        toks = torch.tensor([self._last[id(r)] for r in self._active], device=self.device)
        logits, self._state = decode_engine.step(self.model, toks, self._state)
        self.steps += 1
        self.rows += len(self._active)
        keep = []
        act = self._active
        toks = sample_rows(logits[:, :self.vocab], [r.temperature for r in act], [r.top_p for r in act],
                           [self._gens[id(r)] for r in act]).tolist()
        for i, (r, tok) in enumerate(zip(act, toks)):
            if r._cancelled.is_set():
                self._finish(r, "cancelled")
                continue
            if not self._emit(r, tok):
                self._last[id(r)] = tok
                keep.append(i)
        if len(keep) < len(self._active):
            self._active = [self._active[i] for i in keep]
            if not keep:
                self._state = None
            else:
                idx = torch.tensor(keep, device=self.device)
                self._state = [LayerState(s.conv.index_select(0, idx), s.ssm.index_select(0, idx))
                               for s in self._state]

    def _emit(self, r: Request, tok: int) -> bool:
        """Hand a sampled token to its request; True when the request is done."""
        if r._cancelled.is_set():
            self._finish(r, "cancelled")
            return True
        if self.eos_id is not None and tok == self.eos_id:
            self._finish(r, "stop")
            return True
        r.tokens.append(tok)
        r._out.put(tok)
        if len(r.tokens) >= r.max_tokens:
            self._finish(r, "length")
            return True
        return False

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = r.finish_reason or reason
        self._gens.pop(id(r), None)
        self._last.pop(id(r), None)
        r._out.put(_END)
