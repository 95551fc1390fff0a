"""`ternary-mamba ppl`: perplexity and bits per byte of held-out text, in non-overlapping windows of the
model's context length, batched.  bits/byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored text,
which compares models with different tokenizers."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..runtime.load import load_for_scoring
from ..runtime.metrics import IGNORE, heldout_windows
from ..formats.text import find_text_files, read_documents
from ..ops.device import autocast, module_device, precision
from ..log import say


@torch.no_grad()
def text_perplexity(model, tok, texts: list[str], seq_len: int, batch_size: int, max_tokens: int | None = None,
                    progress: str | None = None) -> dict:
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + ([tok.eos_id] if tok.eos_id is not None else [])
    if max_tokens:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise UserError("no text to score")
    data = torch.tensor(ids)
    windows = [(s, min(s + seq_len, len(ids) - 1)) for s in range(0, len(ids) - 1, seq_len)]
    dev = module_device(model)
    batches = []
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        L = max(e - s for s, e in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        y = torch.full((len(group), L), IGNORE, dtype=torch.long)
        for j, (s, e) in enumerate(group):
            x[j, :e - s], y[j, :e - s] = data[s:e], data[s + 1:e + 1]
        batches.append((x.to(dev), y.to(dev)))
    w = heldout_windows(model, batches, progress=progress)   # the one held-out metric (runtime.metrics)
    nll, n = sum(w["ce"]), int(sum(w["tokens"]))
    nbytes = len(tok.decode(ids[1:n + 1]).encode("utf-8"))
    return {"tokens": n, "ppl": math.exp(nll / n), "bits_per_byte": nll / math.log(2) / max(nbytes, 1), "bytes": nbytes}


def run_ppl(args) -> dict:
    """`args`: a PplConfig (commands/configs.py) or anything with its fields.  Returns {model: result}."""
    results = {}
    device, dtype = precision(getattr(args, "device", None), getattr(args, "dtype", "fp32"))
    texts = [doc for f in find_text_files(args.text) for doc in read_documents(f)]
    say(f"{'model':<40} {'tokens':>10} {'ppl':>10} {'bits/byte':>10} {'time':>8}")
    for m in args.models:
        model, tok = load_for_scoring(m, device)
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
                r = text_perplexity(mdl, tok, texts, args.seq_len, args.batch_size, args.max_tokens,
                                    progress=m + suffix)
            results[m + suffix] = r
            say(f"{m + suffix:<40} {r['tokens']:>10,} {r['ppl']:>10.3f} {r['bits_per_byte']:>10.4f} "
                  f"{time.time() - t0:>7.1f}s")
        if getattr(args, "activations", False):
            if not getattr(model, "packed_header", None):
                raise UserError(f"{m}: --activations needs a packed model (export --format tq2 or tq1)")
            results.update(run_activation_variants(args, model, tok, texts, m))
    return results


@torch.no_grad()
def decode_path_scores(model, tok, texts: list[str], variants: dict, max_tokens: int = 4096) -> dict:
    """Score the text token by token through the decode step (the GEMVs `generate` uses) with the model as it is
    (the exact path) and with each variant (a copy with e.g. int8 or bf16 activations): perplexity of each and
    the mean KL(exact || variant) per token.  {name: {"ppl", "kl"}} with "exact" first."""
    from ..runtime.decode_engine import step
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t) + ([tok.eos_id] if tok.eos_id is not None else [])
        if len(ids) > max_tokens:
            break
    ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise UserError("no text to score")
    vocab = model.config.vocab_size
    models = {"exact": model, **variants}
    states = {k: m.empty_state(1) for k, m in models.items()}
    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    for i in range(len(ids) - 1):
        x = torch.tensor([ids[i]])
        logp = {}
        for k, m in models.items():
            logits, states[k] = step(m, x, states[k])
            logp[k] = F.log_softmax(logits[0, :vocab].float(), -1)
            nll[k] -= float(logp[k][ids[i + 1]])
        for k in variants:
            kl[k] += float((logp["exact"].exp() * (logp["exact"] - logp[k])).sum())
    n = len(ids) - 1
    return {k: {"tokens": n, "ppl": math.exp(nll[k] / n), "kl": kl[k] / n} for k in models}


def run_activation_variants(args, model, tok, texts: list[str], name: str) -> dict:
    """`ppl --activations`: the packed model's decode path with int8 (a8) and bf16 (A16) activations vs exact."""
    import copy

    from ..runtime.packed_linear import use_a8_activations, use_bf16_activations
    variants = {}
    for label, opt_in in (("a8 (int8 activations)", use_a8_activations), ("bf16 (A16)", use_bf16_activations)):
        mv = copy.deepcopy(model)
        if opt_in(mv):
            variants[label] = mv
        else:
            say(f"{name}: {label}: not available here (needs packed groups of 128 / 64, and AVX512-BF16 for bf16)")
    if not variants:
        return {}
    limit = args.max_tokens or 4096
    r = decode_path_scores(model, tok, texts, variants, limit)
    for k, v in r.items():
        say(f"{name} decode path, {k:<22} {v['tokens']:>8,} tokens  ppl {v['ppl']:9.3f}  "
              f"KL to exact {v['kl']:.2e} nats/token")
    return {f"{name} decode {k}": v for k, v in r.items()}
