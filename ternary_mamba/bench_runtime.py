"""`ternary-mamba bench decode|prefill`: our runtime on one model, dense fp32 vs packed ternary, in one
run, plus the memory bandwidth measured in the same run (achieved GB/s = bytes read per token x tok/s)."""
from __future__ import annotations

import time

import torch

from .config import PRESETS, Mamba2Config
from .model import Mamba2LM

LLAMA_CPP = {  # measured on these machines, 2 threads (../shared/MACHINE.md)
    "mamba2-130m": {"decode": {"f32": 41, "tq2": 128, "tq1": 114}, "prefill": {"f32": 330, "tq2": 405}},
    "mamba2-1.3b": {"decode": {"f16": 7.7, "tq2": 23, "tq1": 18}, "prefill": {"f16": 45, "tq2": 48}},
}


def memory_bandwidth_gbs(mb: int = 512) -> float:
    x = torch.ones(mb * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


@torch.no_grad()
def pack_in_place(model: Mamba2LM, group_size: int = 128) -> None:
    """Replace in_proj/out_proj by packed ternary modules made from absmean PTQ of the current weights."""
    from .packed import PackedTernaryLinear
    from .quant.packing import pack
    from .quant.ternary import absmean_scale, round_scale, ternary_codes
    for layer in model.backbone.layers:
        for name in ("in_proj", "out_proj"):
            lin = getattr(layer.mixer, name)
            s16 = round_scale(absmean_scale(lin.weight, group_size))
            codes = pack(ternary_codes(lin.weight, s16, group_size), "tq2").view(lin.out_features, -1)
            setattr(layer.mixer, name, PackedTernaryLinear(codes, s16.half(), lin.in_features, group_size, None))


def bytes_per_token(model) -> int:
    """Bytes a decode step reads: every buffer/parameter once, but only one embedding row (tied head reads all)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    emb = model.backbone.embedding.weight
    if getattr(model.lm_head, "weight", None) is not emb:  # the head no longer reads the embedding: one row
        total -= emb.numel() * emb.element_size() - emb.size(1) * emb.element_size()
    return total


def _decode_tok_s(model, n: int) -> float:
    state = model.empty_state(1)
    tok = torch.zeros(1, dtype=torch.long)
    for _ in range(3):
        _, state = model.step(tok, state, inplace=True)
    t = time.perf_counter()
    for _ in range(n):
        logits, state = model.step(tok, state, inplace=True)
    return n / (time.perf_counter() - t)


def _prefill_tok_s(model, n: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    model(ids[:, :64])
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        model(ids)
        best = min(best, time.perf_counter() - t)
    return n / best


def llama_cpp_tok_s(model, what: str, n: int, threads: int) -> dict[str, float] | None:
    """The same weights through llama.cpp (llama-cpp-python, if installed): f32 and TQ2_0 GGUF files written
    by our exporter (absmean PTQ with groups of 256 for TQ2_0), timed like ours.  None if unavailable."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import copy
    import tempfile
    from pathlib import Path
    from .assets import ASSETS
    from .gguf_io import export_gguf
    from .quant.qat import TernaryConfig, quantize_
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for qtype in ("f32", "tq2_0"):
            m = copy.deepcopy(model)
            if qtype == "tq2_0":
                quantize_(m, TernaryConfig(group_size=256))
            path = Path(d) / f"{qtype}.gguf"
            # token texts do not matter for timing: the bundled tokenizer, padded to the model's vocabulary
            export_gguf(m, path, qtype, ASSETS / "gutenberg-bpe-8k.json")
            del m
            llm = llama_cpp.Llama(str(path), n_ctx=max(n, 64) + 8, n_batch=max(n, 64), n_ubatch=max(n, 64),
                                  n_threads=threads, n_threads_batch=threads, verbose=False)
            toks = [int(t) for t in torch.randint(10, 8000, (n,))]
            if what == "decode":
                llm.eval(toks[:3])
                t = time.perf_counter()
                for tok in toks:
                    llm.eval([tok])
                out[qtype] = n / (time.perf_counter() - t)
            else:
                best = float("inf")
                for _ in range(2):
                    llm.reset()
                    t = time.perf_counter()
                    llm.eval(toks)
                    best = min(best, time.perf_counter() - t)
                out[qtype] = n / best
            del llm
    return out


def load_bench_model(name: str):
    if name in PRESETS:
        torch.manual_seed(0)
        return Mamba2LM(Mamba2Config(**PRESETS[name], chunk_size=64)).eval()
    from .checkpoint import load_model
    return load_model(name)


@torch.no_grad()
def run_bench_runtime(args) -> None:
    bw = memory_bandwidth_gbs()
    print(f"memory read bandwidth (measured now): {bw:.1f} GB/s; threads {torch.get_num_threads()}")
    for name in args.models:
        model = load_bench_model(name)
        if getattr(model, "ternary_config", None) is not None or getattr(model, "packed_header", None):
            print(f"{name}: pass a full-precision model or a preset; skipping")
            continue
        results = {}
        for variant in ("fp32", "tq2", "tq2+i8head", "tq2+i8head+a8"):
            if variant == "tq2":
                pack_in_place(model)
            if variant.startswith("tq2+"):
                if args.what != "decode":
                    continue
            if variant == "tq2+i8head":
                from .int8_head import use_int8_head
                use_int8_head(model)
            if variant == "tq2+i8head+a8":   # opt-in, not bit-exact: int8 activations in the ternary GEMV
                from .packed import use_a8_activations
                use_a8_activations(model)
            nbytes = bytes_per_token(model)
            if args.what == "decode":
                r = _decode_tok_s(model, args.tokens)
                results[variant] = r
                print(f"{name} decode {variant:>13}: {r:8.1f} tok/s  {nbytes / 1e6:8.1f} MB/token  "
                      f"{nbytes * r / 1e9:5.1f} GB/s = {100 * nbytes * r / 1e9 / bw:3.0f} % of bandwidth")
            else:
                r = _prefill_tok_s(model, args.tokens)
                results[variant] = r
                print(f"{name} prefill {variant:>13} 1x{args.tokens}: {r:8.1f} tok/s")
        ref = LLAMA_CPP.get(name, {}).get(args.what, {})
        same_run = llama_cpp_tok_s(load_bench_model(name), args.what, args.tokens, torch.get_num_threads())
        if same_run:
            ref = {k: round(v, 1) for k, v in same_run.items()}
            print(f"{name} {args.what} llama.cpp (same run, our GGUF export): "
                  + ", ".join(f"{k} {v:.1f} tok/s" for k, v in same_run.items())
                  + f"; ours fp32 / llama.cpp f32 = {results['fp32'] / same_run['f32']:.2f}x, "
                  f"ours tq2 / llama.cpp TQ2_0 = {results['tq2'] / same_run['tq2_0']:.2f}x"
                  + (f", ours tq2+i8head+a8 / llama.cpp TQ2_0 = {results['tq2+i8head+a8'] / same_run['tq2_0']:.2f}x"
                     if "tq2+i8head+a8" in results else ""))
        extra = "".join(f", {v} / fp32 = {results[v] / results['fp32']:.2f}x" for v in ("tq2+i8head", "tq2+i8head+a8")
                        if v in results)
        print(f"{name} {args.what}: tq2 / fp32 = {results['tq2'] / results['fp32']:.2f}x{extra}  (tq1 is re-packed to "
              f"the tq2 layout at load: same speed)  llama.cpp reference: {ref or 'n/a'}")
        del model
