"""Batched log-likelihood scoring of (context, continuation) pairs, the primitive behind every task.

Tokenization follows lm-eval: trailing spaces of the context move to the continuation, the pair is
encoded whole and the continuation's tokens are those after the context's; an empty context is
replaced by the end-of-text token.  Sequences longer than `max_len` keep their last `max_len` tokens."""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..ops.device import module_device


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tok.eos_id if tok.eos_id is not None else 0]
    return ctx, cont


@torch.no_grad()
def loglikelihoods(model, tok, pairs: list[tuple[str, str]], batch_size: int = 16, max_len: int = 1024,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """[(sum log p(continuation | context), continuation is the greedy decode)] in input order."""
    encoded = [encode_pair(tok, c, x) for c, x in pairs]
    seqs = []
    for ctx, cont in encoded:
        full = (ctx + cont)[-(max_len + 1):]
        seqs.append((full[:-1], full[1:], len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    vocab = model.config.vocab_size
    dev = module_device(model)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    t0 = last = time.time()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        L = len(seqs[idx[0]][0])
        inp = torch.zeros(len(idx), L, dtype=torch.long)
        for j, i in enumerate(idx):
            x = seqs[i][0]
            inp[j, :len(x)] = torch.tensor(x)  # right padding: a causal model never sees it
        logits = model(inp.to(dev))[..., :vocab].float()
        if not bool(torch.isfinite(logits).all()):
            raise UserError("the model produced NaN or infinite logits: its weights are corrupt or overflowed")
        logp = F.log_softmax(logits, dim=-1).cpu()
        for j, i in enumerate(idx):
            x, y, n = seqs[i]
            pos = torch.arange(len(x) - n, len(x))
            tgt = torch.tensor(y[-n:])
            lp = logp[j, pos]
            results[i] = (lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all()))
        done = min(b + batch_size, len(order))
        if progress and sys.stderr.isatty():
            print(f"\r  {done}/{len(order)} requests, {done / (time.time() - t0):.1f} req/s", end="", file=sys.stderr)
        elif progress and time.time() - last >= 30:      # piped: a plain line every 30 s
            last = time.time()
            print(f"  {done}/{len(order)} requests, {done / (last - t0):.1f} req/s", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return results
