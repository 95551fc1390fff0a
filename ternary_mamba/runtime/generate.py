"""Text generation: chunked-scan prefill of the prompt, then O(1) recurrent decoding, streamed."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import UserError
from ..ops.device import module_device
from .decode_engine import session


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """logits (b, V) -> token ids (b,), every row with the same settings and generator.  temperature 0 = greedy;
    top_p < 1 = nucleus sampling."""
    return sample_rows(logits, [temperature] * logits.size(0), [top_p] * logits.size(0), [gen] * logits.size(0))


def sample_rows(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                gens: list[torch.Generator]) -> torch.Tensor:
    """logits (b, V) -> token ids (b,), row i with its own temperature, top-p and generator, in one vectorised
    pass (a serving batch samples every request at once).  Inverse-CDF sampling: one uniform draw per row from
    its generator, so a row's token does not depend on the other rows."""
    if not bool(torch.isfinite(logits).all()):
        raise UserError("the model produced NaN or infinite logits: its weights are corrupt or overflowed")
    out = logits.argmax(-1)
    plain = [i for i, t in enumerate(temperatures) if t > 0 and top_ps[i] >= 1.0]
    nucleus = [i for i, t in enumerate(temperatures) if t > 0 and top_ps[i] < 1.0]
    for rows, sort in ((plain, False), (nucleus, True)):   # each row always takes the same path, alone or not
        if not rows:
            continue
        idx = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([temperatures[i] for i in rows], device=logits.device, dtype=torch.float32)
        probs = torch.softmax(logits.index_select(0, idx).float() / temp[:, None], dim=-1)
        if sort:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            top_p = torch.tensor([top_ps[i] for i in rows], device=logits.device, dtype=torch.float32)
            cdf = (sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p[:, None])).cumsum(-1)  # keeps the top token
        else:                                   # no nucleus: the CDF in vocabulary order (no sort)
            order, cdf = None, probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=gens[i]) for i in rows]).to(logits.device) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None].contiguous(), right=True).clamp_max_(cdf.size(-1) - 1)
        out[idx] = (pick if order is None else order.gather(-1, pick)).squeeze(-1)
    return out


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
