"""Text generation: chunked-scan prefill of the prompt, then O(1) recurrent decoding, streamed."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import UserError
from ..ops.device import module_device
from .decode_engine import session


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """logits (b, V) -> token ids (b,).  temperature 0 = greedy; top_p < 1 = nucleus sampling."""
    if not bool(torch.isfinite(logits).all()):
        raise UserError("the model produced NaN or infinite logits: its weights are corrupt or overflowed")
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, stop_id: int | None = None) -> Iterator[int]:
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    dev = module_device(model)
    logits, state = model(torch.tensor([prompt_ids], device=dev), return_state=True, last_only=True)
    logits = logits[:, -1]
    sess = session(model, state)   # the C decode step, checked once (None: step module by module)
    greedy = temperature <= 0 and sess is not None   # the engine's certified greedy step: same tokens
    tok = sample_next(logits[:, :vocab], temperature, top_p, gen).item()
    for i in range(max_new_tokens):
        if stop_id is not None and tok == stop_id:
            return
        yield tok
        if i + 1 == max_new_tokens:
            return
        if greedy:
            tok = sess.step_greedy([tok], vocab)[0]
            continue
        if sess is not None:
            logits = sess.step([tok])
        else:
            logits, state = model.step(torch.tensor([tok], device=dev), state, inplace=True)
        tok = sample_next(logits[:, :vocab], temperature, top_p, gen).item()


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
    """Generate a continuation; `on_text` receives each new piece of text as soon as it decodes cleanly."""
    ids: list[int] = []
    shown = ""
    for tok in generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature, top_p, seed,
                            tokenizer.eos_id):
        ids.append(tok)
        text = tokenizer.decode(ids)
        if on_text and not text.endswith("\ufffd") and len(text) > len(shown):  # wait for complete UTF-8
            on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(ids)
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
