"""`ternary-mamba bench decode|prefill`: our runtime on one model, dense fp32 vs packed ternary, in one
run, plus the memory bandwidth measured in the same run (achieved GB/s = bytes read per token x tok/s)."""
from __future__ import annotations

import time

import torch

from ..core.config import PRESETS, Mamba2Config
from ..core.model import Mamba2LM
from ..ops.device import cpu_description
from ..runtime.convert import ptq_pack_
from ..log import say
from .probes import memory_bandwidth_gbs, read_only_timer, thread_scaling
from .roofline import bytes_breakdown, bytes_per_token, kernel_summary
from .rounds import interleaved_rounds, paired_share, round_ratio, share_text

LLAMA_CPP = {  # llama.cpp built from source, AVX2 + FMA CPU, 2 threads, random weights (reference points)
    "mamba2-130m": {"decode": {"f32": 41, "tq2": 128, "tq1": 114}, "prefill": {"f32": 330, "tq2": 405}},
    "mamba2-1.3b": {"decode": {"f16": 7.7, "tq2": 23, "tq1": 18}, "prefill": {"f16": 45, "tq2": 48}},
}


def llama_cpp_version() -> str:
    """The llama.cpp version compared against, and the ISA its build uses (an AVX-512 build and an AVX2 one of the
    same version run at different speeds on the same CPU)."""
    try:
        import llama_cpp
    except ImportError:
        return "llama.cpp: not installed (pip install '.[llama]' to compare in the same run)"
    isa = ""
    try:
        info = llama_cpp.llama_print_system_info()
        info = info.decode() if isinstance(info, bytes) else str(info)
        on = [k.strip() for k, _, v in (f.partition("=") for f in info.split("|")) if v.strip() == "1"]
        names = [n.split(":")[-1].strip() for n in on]
        isa = " (built for " + "/".join(n for n in names if n.startswith("AVX")) + ")" if names else ""
    except Exception:  # noqa: BLE001 - an older binding without the call: the version alone
        pass
    return f"llama.cpp via llama-cpp-python {llama_cpp.__version__}{isa}"


@torch.no_grad()
def pack_in_place(model: Mamba2LM, group_size: int = 128) -> None:
    """Replace in_proj/out_proj by packed ternary modules made from absmean PTQ of the current weights."""
    ptq_pack_(model, group_size)


# ---- timers: each call runs one round (n tokens) and returns tok/s; rounds of all variants are interleaved
def _decode_timer(model, n: int, greedy: bool = False):
    """Decoding as `generate` does it: a DecodeSession (one C call per token) when the engine runs the model;
    greedy: the session's certified greedy step (an int8 pre-pass over the head, the same tokens)."""
    from ..runtime.decode_engine import session
    state = model.empty_state(1)
    sess = session(model, state)
    tok = torch.zeros(1, dtype=torch.long)
    vocab = model.config.vocab_size

    def one() -> None:
        nonlocal state
        if sess is not None and greedy:
            sess.step_greedy([0], vocab)
        elif sess is not None:
            sess.step([0])
        else:
            _, state = model.step(tok, state, inplace=True)
    for _ in range(3):
        one()

    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            one()
        return n / (time.perf_counter() - t)
    return run


def _prefill_timer(model, n: int):
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    model(ids[:, :64], last_only=True)

    def run() -> float:
        t = time.perf_counter()
        model(ids, last_only=True)   # the prompt's states + next-token logits (as llama.cpp computes them)
        return n / (time.perf_counter() - t)
    return run


def llama_cpp_timers(model, what: str, n: int, threads: int, workdir,
                     qtypes: tuple[str, ...] = ("f32", "tq2_0")) -> dict | None:
    """The same weights through llama.cpp (llama-cpp-python, if installed): f32 and TQ2_0 GGUF files written
    by our exporter (absmean PTQ with groups of 256 for TQ2_0).  Each timer runs n tokens and returns tok/s:
    decode = n single-token evals after a 3-token prompt; prefill = one eval of n tokens (next-token logits
    only).  None if unavailable."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import copy
    from pathlib import Path
    from ..assets import ASSETS
    from ..formats.gguf import export_gguf
    from ..quant.qat import TernaryConfig, quantize_
    from ..runtime.memory import release_freed_memory
    timers = {}
    for qtype in qtypes:
        m = model
        if qtype == "tq2_0":   # quantize a copy; the f32 export reads the model as it is
            m = copy.deepcopy(model)
            quantize_(m, TernaryConfig(group_size=256))
        path = Path(workdir) / f"{qtype}.gguf"
        # token texts do not matter for timing: the bundled tokenizer, padded to the model's vocabulary
        export_gguf(m, path, qtype, ASSETS / "gutenberg-bpe-8k.json")
        del m
        release_freed_memory()   # the quantized copy: llama.cpp maps the file next and needs the page cache
        llm = llama_cpp.Llama(str(path), n_ctx=max(n, 64) * 4 + 8, n_batch=max(n, 64), n_ubatch=max(n, 64),
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        toks = [int(t) for t in torch.randint(10, 8000, (n,))]

        def run(llm=llm, toks=toks) -> float:
            if what == "decode":
                llm.reset()
                llm.eval(toks[:3])
                t = time.perf_counter()
                for tok in toks:
                    llm.eval([tok])
            else:
                llm.reset()
                t = time.perf_counter()
                llm.eval(toks)
            return len(toks) / (time.perf_counter() - t)
        timers[f"llama.cpp {qtype.upper()}"] = run
    return timers


def load_bench_model(name: str):
    if name in PRESETS:
        torch.manual_seed(0)
        return Mamba2LM(Mamba2Config(**{"chunk_size": 64, **PRESETS[name]})).eval()
    from ..runtime.load import load_model
    return load_model(name)


def build_variants(model: Mamba2LM, what: str) -> dict[str, Mamba2LM]:
    """fp32 (the model itself); packed tq2 as a packed folder loads (exact ternary products, the fp16 head it
    stores); + bf16 activations (AVX512-BF16 CPUs); + 8-bit head; + int8 activations."""
    import copy
    from ..runtime.decode_engine import use_bf16_state
    from ..runtime.heads import use_fp16_head, use_int8_head, use_q4_head
    from ..ops.dispatch import cpu_has_bf16_kernels
    from ..runtime.packed_linear import use_a8_activations, use_bf16_activations
    out = {"fp32": model}
    tq2 = copy.deepcopy(model)
    pack_in_place(tq2)
    use_fp16_head(tq2)
    out["tq2"] = tq2
    if cpu_has_bf16_kernels():      # the paper's A16 where the CPU has AVX512-BF16 (opt-in, not exact)
        a16 = copy.deepcopy(tq2)
        use_bf16_activations(a16)
        out["tq2+bf16"] = a16
    i8 = copy.deepcopy(tq2)
    use_int8_head(i8)
    out["tq2+i8head"] = i8
    a8 = copy.deepcopy(i8)
    use_a8_activations(a8)   # opt-in, not bit-exact: int8 activations (decode GEMV; prefill VNNI GEMM)
    out["tq2+i8head+a8"] = a8
    if what == "decode":     # the fewest bytes per token: 4-bit head, int8 activations, bf16 SSM state
        fast = copy.deepcopy(tq2)
        use_q4_head(fast)
        use_a8_activations(fast)
        use_bf16_state(fast)
        out["tq2+q4head+a8+s16"] = fast
    return out


@torch.no_grad()
def mode_quality(variants: dict, n: int, exact: str = "tq2", seed: int = 0) -> dict[str, tuple[float, float]]:
    """{variant: (mean KL(exact || variant) nats per token, top-1 agreement)} over n teacher-forced tokens (the
    exact variant's own greedy continuation of a seeded random prompt, so the positions are ones the model
    would reach), decoding one token at a time as generate does."""
    from ..runtime.modes import teacher_forced_logprobs
    ref_model = variants[exact]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref_model.config.vocab_size, (8,), generator=g).tolist()
    ids += greedy_tokens(ref_model, ids, n - len(ids) + 1) if n + 1 > len(ids) else []
    ids = ids[:n + 1]
    ref = teacher_forced_logprobs(ref_model, ids)
    out = {}
    for k, m in variants.items():
        if k in (exact, "fp32"):           # fp32: the unquantized model, not a mode of the packed one
            continue
        lp = teacher_forced_logprobs(m, ids)
        out[k] = (float((ref.exp() * (ref - lp)).sum(-1).mean()), float((lp.argmax(-1) == ref.argmax(-1)).float().mean()))
    return out


@torch.no_grad()
def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, decoded as generate does (the engine's session when it runs the model)."""
    from ..runtime.generate import generate_ids
    return list(generate_ids(model, prompt, n, temperature=0.0))


@torch.no_grad()
def decode_profile(model, n: int) -> dict[str, float] | None:
    """ms per token in each phase of the C decode step (None if the model does not use the engine)."""
    from ..runtime.decode_engine import DecodeEngine, engine_for, fast_step
    eng = engine_for(model)
    if eng is None:
        return None
    state = model.empty_state(1)
    tok = torch.zeros(1, dtype=torch.long)
    eng.profile = torch.zeros(len(DecodeEngine.PHASES), dtype=torch.float64)
    for _ in range(n):
        _, state = fast_step(model, tok, state)   # the engine itself (Mamba2LM.step is the module path)
    prof, eng.profile = eng.profile, None
    return {k: 1e3 * v / n for k, v in zip(DecodeEngine.PHASES, prof.tolist())}


def read_only_text(timer, rate: float, bw: float, ratio: float | None) -> str:
    """A decode mode's line about the read-only pass over its own bytes (`probes.read_only_timer`)."""
    gbs = rate * timer.nbytes / 1e9
    text = (f"read-only pass over these bytes ({timer.nbytes / 1e6:.1f} MB in the engine's order, nothing computed): "
            f"{rate:.1f} /s = {gbs:.1f} GB/s (" + (f"{100 * gbs / bw:.0f} % of the best probe)" if gbs <= bw else
                                                   "above the best probe: a faster moment)"))
    if ratio is None:
        return text
    return text + (f"; this mode at {ratio:.0f} % of its rate (median of the rounds)" if ratio <= 100 else
                   "; this mode faster than it (median of the rounds: the pass is no limit there)")


@torch.no_grad()
def run_bench_runtime(cfg) -> None:
    import tempfile
    from pathlib import Path
    from ..errors import UserError
    from ..runtime.memory import release_freed_memory
    for name in cfg.models:   # fail before minutes of measuring, not after
        hub_id = name.count("/") == 1 and not name.startswith((".", "/"))
        if name not in PRESETS and not Path(name).is_dir() and not hub_id:
            raise UserError(f"{name}: neither a preset ({', '.join(PRESETS)}), a model folder nor a hub id")
    bw = memory_bandwidth_gbs()
    rounds = cfg.rounds
    say(f"machine: {cpu_description()}; {llama_cpp_version()}")
    scale = thread_scaling()
    if scale is not None:
        say(f"vector arithmetic on {torch.get_num_threads()} threads: {scale:.2f}x one thread's (C compute probe: the "
            f"thread count on free cores, less where the host shares them; arithmetic-bound kernels scale the same)")
    say(f"memory read bandwidth (measured now; each round measures it again): {bw:.1f} GB/s; threads {torch.get_num_threads()}; "
          f"best of {rounds} interleaved rounds per variant")
    for name in cfg.models:
        model = load_bench_model(name)
        if getattr(model, "ternary_config", None) is not None or getattr(model, "packed_header", None):
            say(f"{name}: pass a full-precision model or a preset; skipping")
            continue
        variants = build_variants(model, cfg.what)
        release_freed_memory()   # the fp32 projections the packed copies replaced
        per_round = max(1, cfg.tokens // rounds) if cfg.what == "decode" else cfg.tokens
        make = _decode_timer if cfg.what == "decode" else _prefill_timer
        timers = {k: make(m, per_round) for k, m in variants.items()}
        ro: dict[str, object] = {}
        if cfg.what == "decode":   # each engine mode's bytes read with nothing computed, timed right after the mode
            ro = {k: t for k, m in variants.items() if (t := read_only_timer(m, per_round)) is not None}
            paired_timers = {}
            for k, t in timers.items():
                paired_timers[k] = t
                if k in ro:
                    paired_timers[f"{k} read-only"] = ro[k]
            timers = paired_timers
            # greedy decoding: the same tokens as argmax of the full logits
            timers.update({f"{k} greedy": _decode_timer(variants[k], per_round, greedy=True)
                           for k in ("fp32", "tq2") if k in variants})
        with tempfile.TemporaryDirectory() as tmp:
            llama = llama_cpp_timers(model, cfg.what, per_round, torch.get_num_threads(), tmp)
            timers.update(llama or {})
            # the probe is one more interleaved variant (its best counts), also read around each roofline variant
            best, around, top = interleaved_rounds(timers, rounds, memory_bandwidth_gbs, set(variants) | {
                f"{k} read-only" for k in ro} if cfg.what == "decode" else set())
            bw = max(bw, top)
            del timers, llama
        what = "decode" if cfg.what == "decode" else f"prefill 1x{cfg.tokens}"
        say(f"{name}: memory read bandwidth, best of the run's probes ("
            + ("read at the start of each round and after each variant, the roofline's denominator"
               if cfg.what == "decode" else "one at the start of each round") + f"): {bw:.1f} GB/s")
        for k, r in best.items():
            if k.endswith(" read-only"):
                continue
            line = f"{name} {what} {k:>17}: {r:8.1f} tok/s"
            if k in variants:
                nbytes = bytes_per_token(variants[k])
                line += f"  x{r / best['fp32']:5.2f} of fp32"
                if cfg.what == "decode":
                    share, near = 100 * nbytes * r / 1e9 / bw, paired_share(around.get(k, []), nbytes)
                    line += (f"  {nbytes / 1e6:7.1f} MB/token  roofline {bw * 1e9 / nbytes:7.1f} tok/s  "
                             + share_text(share, near))
                    parts = bytes_breakdown(variants[k])          # sums to nbytes (tests/test_bench.py)
                    line += "\n" + " " * 24 + "MB/token: " + ", ".join(
                        f"{p} {v / 1e6:.1f}" for p, v in parts.items() if v) + f"; kernels: {kernel_summary(variants[k])}"
                    if k in ro:
                        line += "\n" + " " * 24 + read_only_text(ro[k], best[f"{k} read-only"], bw,
                                                                  round_ratio(around[k], around[f"{k} read-only"]))
            say(line)
        if "llama.cpp F32" in best:
            lf, lt = best["llama.cpp F32"], best["llama.cpp TQ2_0"]
            say(f"{name} {what} vs llama.cpp (same run, same weights via our GGUF export): "
                  + ", ".join(f"{k} / llama.cpp {'F32' if k == 'fp32' else 'TQ2_0'} = "
                              f"{best[k] / (lf if k == 'fp32' else lt):.2f}x" for k in variants))
            greedy = [k for k in best if k.endswith(" greedy")]
            if greedy:
                say(f"{name} {what} greedy vs llama.cpp (whose greedy decoding computes the full logits): "
                      + ", ".join(f"{k} / llama.cpp {'F32' if k.startswith('fp32') else 'TQ2_0'} = "
                                  f"{best[k] / (lf if k.startswith('fp32') else lt):.2f}x" for k in greedy))
        else:
            say(f"{name}: llama.cpp not installed (pip install '.[llama]'); figures measured earlier on these "
                  f"machines: {LLAMA_CPP.get(name, {}).get(cfg.what, 'n/a')}")
        if cfg.what == "decode" and cfg.quality_tokens:
            q = mode_quality(variants, cfg.quality_tokens)
            say(f"{name} decode quality vs the exact tq2 path ({cfg.quality_tokens} teacher-forced tokens: the exact "
                "path's greedy continuation of a random prompt): " + "; ".join(
                    f"{k} KL {kl:.2e} top-1 {t1:.1%}" for k, (kl, t1) in q.items()))
        if cfg.what == "decode" and cfg.agreement and "tq2+q4head+a8+s16" in variants:
            import copy
            from ..runtime.decode_engine import use_bf16_state
            fast = variants["tq2+q4head+a8+s16"]
            fp32_state = copy.deepcopy(fast)      # the same mode with an fp32 SSM state
            use_bf16_state(fp32_state, False)
            prompt = [1, 2, 3, 4]
            a, b = greedy_tokens(fast, prompt, cfg.agreement), greedy_tokens(fp32_state, prompt, cfg.agreement)
            same = sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b)))
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            # greedy loops can hide drift (a repeated cycle agrees trivially): also the next-token distributions
            # along a sampled continuation (temperature 1) of the fp32-state path, teacher-forced
            from ..runtime.generate import generate_ids
            from ..runtime.modes import teacher_forced_logprobs
            seq = prompt + list(generate_ids(fp32_state, prompt, cfg.agreement, temperature=1.0, top_p=1.0))
            ref, lp = teacher_forced_logprobs(fp32_state, seq), teacher_forced_logprobs(fast, seq)
            kl = (ref.exp() * (ref - lp)).sum(-1)
            t1 = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
            say(f"{name} bf16 SSM state vs fp32 state ({cfg.agreement} tokens, fast mode otherwise): greedy "
                f"generation {same:.1%} of positions agree (first difference: "
                f"{'none' if first is None else f'token {first}'}; {len(set(a))} distinct tokens); teacher-forced on "
                f"a sampled continuation: KL {float(kl.mean()):.2e} (last 256 tokens {float(kl[-256:].mean()):.2e}), "
                f"top-1 {t1:.1%}")
            del fp32_state
        if cfg.what == "decode":
            for k, m in variants.items():
                prof = decode_profile(m, max(8, per_round))
                if prof:
                    say(f"{name} decode profile {k:>13} (ms/token): "
                          + ", ".join(f"{p} {v:.2f}" for p, v in prof.items()))
        del model, variants
        release_freed_memory()   # the next model's llama.cpp files need the page cache
