"""`ternary-mamba ppl`: perplexity and bits per byte of held-out text, in non-overlapping windows of the
model's context length, batched.  bits/byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored text,
which compares models with different tokenizers."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..formats.load import load_model_and_tokenizer
from ..formats.text import find_text_files, read_documents
from ..ops.device import autocast, module_device, precision


@torch.no_grad()
def text_perplexity(model, tok, texts: list[str], seq_len: int, batch_size: int, max_tokens: int | None = None) -> dict:
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + ([tok.eos_id] if tok.eos_id is not None else [])
    if max_tokens:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise UserError("no text to score")
    data = torch.tensor(ids)
    windows = [(s, min(s + seq_len, len(ids) - 1)) for s in range(0, len(ids) - 1, seq_len)]
    nll, n = 0.0, 0
    vocab = model.config.vocab_size
    dev = module_device(model)
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        L = max(e - s for s, e in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        y = torch.full((len(group), L), -100, dtype=torch.long)
        for j, (s, e) in enumerate(group):
            x[j, :e - s], y[j, :e - s] = data[s:e], data[s + 1:e + 1]
        logits = model(x.to(dev))[..., :vocab]
        if not bool(torch.isfinite(logits).all()):
            raise UserError("the model produced NaN or infinite logits: its weights are corrupt or overflowed")
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten(), ignore_index=-100, reduction="sum").item()
        n += int((y != -100).sum())
    nbytes = len(tok.decode(ids[1:n + 1]).encode("utf-8"))
    return {"tokens": n, "ppl": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / max(nbytes, 1), "bytes": nbytes}


def run_ppl(args) -> dict:
    """`args`: a PplConfig (commands/configs.py) or anything with its fields.  Returns {model: result}."""
    results = {}
    device, dtype = precision(getattr(args, "device", None), getattr(args, "dtype", "fp32"))
    texts = [doc for f in find_text_files(args.text) for doc in read_documents(f)]
    print(f"{'model':<40} {'tokens':>10} {'ppl':>10} {'bits/byte':>10} {'time':>8}")
    for m in args.models:
        model, tok = load_model_and_tokenizer(m)
        model = model.to(device)
        variants = [("", model)]
        if args.int8_head:
            import copy

            from ..runtime.heads import use_int8_head
            m8 = copy.deepcopy(model)
            use_int8_head(m8)
            variants.append((" +int8 head", m8))
        if getattr(args, "quantized_embedding", False):
            import copy

            from ..runtime.tables import use_quantized_embedding
            for fmt in ("int8", "q4"):
                mq = copy.deepcopy(model)
                try:
                    use_quantized_embedding(mq, fmt)
                except ValueError as e:
                    raise UserError(f"{m}: --quantized-embedding: {e}") from None
                variants.append((f" +{fmt} embedding", mq))
        for suffix, mdl in variants:
            t0 = time.time()
            with torch.no_grad(), autocast(device, dtype):
                r = text_perplexity(mdl, tok, texts, args.seq_len, args.batch_size, args.max_tokens)
            results[m + suffix] = r
            print(f"{m + suffix:<40} {r['tokens']:>10,} {r['ppl']:>10.3f} {r['bits_per_byte']:>10.4f} "
                  f"{time.time() - t0:>7.1f}s")
    return results
