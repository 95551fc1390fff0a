"""`ternary-mamba bench model`: our Mamba-2 vs transformers' Mamba2ForCausalLM (its pure-PyTorch path)
on the same weights, in one run, as ratios.  Also the fp32 GEMM FLOP/s measured in the same run, so
training speed is reported as a model-FLOPs utilisation.  Benchmarks belong on an idle machine."""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from ..core.config import PRESETS, Mamba2Config, train_flops_per_token
from ..core.model import Mamba2LM
from ..errors import UserError
from ..spec import DEFAULT_GROUP_SIZE
from ..train.objectives import next_token_loss
from ..log import say


def _best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _interleave(timers: dict, rounds: int, probe=None, after_round=None) -> tuple[dict, float]:
    """Call every timer (a function returning seconds) once per round, after one warm-up call each in the first
    round, and keep each one's smallest time: a noisy spell then hits all variants alike.  `probe` (the machine's
    GEMM rate or bandwidth) is measured every round and its largest value returned."""
    best, top = {key: float("inf") for key in timers}, 0.0
    for r in range(rounds):
        if probe is not None:
            top = max(top, probe())
        for key, timer in timers.items():
            if r == 0:
                timer()
            best[key] = min(best[key], timer())
        if after_round is not None:
            after_round(r, best)
    return best, top


def gemm_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best_time(lambda: a @ b, repeats=5)


def hf_model(cfg: Mamba2Config, ours: Mamba2LM):
    """transformers' model with our weights (silences its one-time 'fast path unavailable' warnings)."""
    import transformers
    from transformers import Mamba2Config as HC, Mamba2ForCausalLM
    transformers.logging.set_verbosity_error()
    hc = HC(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, state_size=cfg.d_state, head_dim=cfg.headdim,
            n_groups=cfg.ngroups, expand=cfg.expand, num_heads=cfg.nheads, vocab_size=cfg.padded_vocab_size,
            chunk_size=cfg.chunk_size, conv_kernel=cfg.d_conv, tie_word_embeddings=True)
    hf = Mamba2ForCausalLM(hc)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    return hf


def _train_step(model, vocab: int, batch: int, seq: int, hf: bool = False, bf16: bool = False):
    """One closure = one optimizer step of forward + backward (fp32, or the forward under bf16 autocast as
    `--dtype bf16` trains; AdamW as our trainer runs it) on a fixed random batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)   # both sides: the fused CPU AdamW
    ids = torch.randint(0, vocab, (batch, seq + 1))

    def step():   # each side with its own loss: transformers' is F.cross_entropy, ours the fused one of training
        if hf:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = next_token_loss(model, ids)
            loss.backward()
        opt.step()
        opt.zero_grad()
    model.train()
    return step


def bench_training(log, rounds: int = 3, chunks=(32, 64, 128)) -> dict:
    """Training tokens/s of ours and of transformers, each at every chunk size in `chunks` (the chunk length is a
    compute knob; each side is reported at its best), on the same weights.  The variants are interleaved over
    `rounds` rounds and each keeps its best step, so a noisy spell hits all of them alike."""
    from ..ops.device import auto_dtype
    bf16 = auto_dtype(torch.device("cpu"))[0] == "bf16"
    base = Mamba2Config(**PRESETS["bench-5m"], chunk_size=64)
    ref = Mamba2LM(base)
    batch, seq = 8, 256
    steps = {}
    for k in chunks:
        cfg = base.replace(chunk_size=k)
        ours = Mamba2LM(cfg, init=False)
        ours.load_state_dict(ref.state_dict())
        steps[("ours", k)] = _train_step(ours, cfg.vocab_size, batch, seq)
        steps[("transformers", k)] = _train_step(hf_model(cfg, ref), cfg.vocab_size, batch, seq, hf=True)
        if bf16 and k == 64:   # what --dtype auto trains with on this CPU
            ours16 = Mamba2LM(cfg, init=False)
            ours16.load_state_dict(ref.state_dict())
            steps[("ours-bf16", k)] = _train_step(ours16, cfg.vocab_size, batch, seq, bf16=True)
            steps[("transformers-bf16", k)] = _train_step(hf_model(cfg, ref), cfg.vocab_size, batch, seq, hf=True,
                                                          bf16=True)
    timers = {key: (lambda step=step: _best_time(step, repeats=2, warmup=0)) for key, step in steps.items()}
    best, flops = _interleave(timers, rounds, gemm_flops, lambda r, best: log(
        f"  round {r + 1}/{rounds}: " + ", ".join(f"{n}@{k} {batch * seq / best[(n, k)]:,.0f}" for n, k in best)))
    tok_s = {key: batch * seq / t for key, t in best.items()}
    t16, h16 = tok_s.pop(("ours-bf16", 64), None), tok_s.pop(("transformers-bf16", 64), None)
    k_ours = max(chunks, key=lambda k: tok_s[("ours", k)])
    k_hf = max(chunks, key=lambda k: tok_s[("transformers", k)])
    t_ours, t_hf = tok_s[("ours", k_ours)], tok_s[("transformers", k_hf)]
    mfu = t_ours * train_flops_per_token(base.replace(chunk_size=k_ours)) / flops
    r = {"config": "bench-5m", "params": base.n_params, "gemm_gflops": flops / 1e9, "ours_tok_s": t_ours,
         "ours_chunk": k_ours, "transformers_tok_s": t_hf, "transformers_chunk": k_hf, "ratio": t_ours / t_hf,
         "mfu": mfu, "all_tok_s": {f"{n}@{k}": v for (n, k), v in tok_s.items()}}
    log(f"training {batch}x{seq}, {base.n_params / 1e6:.1f} M params: ours {t_ours:,.0f} tok/s (chunk {k_ours}), "
        f"transformers {t_hf:,.0f} tok/s (chunk {k_hf}) -> {t_ours / t_hf:.2f}x; {mfu * 100:.0f} % of the "
        f"{flops / 1e9:.0f} GFLOP/s fp32 GEMM measured now")
    if t16 is not None:
        r.update(ours_bf16_tok_s=t16, transformers_bf16_tok_s=h16, bf16_vs_fp32=t16 / tok_s[("ours", 64)],
                 bf16_vs_transformers_bf16=t16 / h16)
        log(f"training under bf16 autocast (what --dtype auto picks on this CPU), chunk 64: ours {t16:,.0f} tok/s "
            f"({t16 / tok_s[('ours', 64)]:.2f}x ours fp32), transformers {h16:,.0f} tok/s -> {t16 / h16:.2f}x")
    else:
        log("training under bf16 autocast: skipped (this CPU has no AVX512-BF16 / AMX; --dtype auto trains in fp32)")
    return r


@torch.no_grad()
def bench_130m(log, decode_tokens: int = 32, rounds: int = 3) -> dict:
    """130m shape: prefill 1 x 512 (all logits, like transformers' forward) and the per-token cost of greedy
    decoding through each side's generate.  The measurements are interleaved over `rounds` rounds; each keeps
    its best."""
    cfg = Mamba2Config(**PRESETS["mamba2-130m"], chunk_size=64)
    ours = Mamba2LM(cfg).eval()
    hf = hf_model(cfg.replace(chunk_size=256), ours).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 512))
    prompt = ids[:, :8]

    def decode_ours(n):   # greedy, like transformers' generate below: prompt prefill + n new tokens
        from ..runtime.generate import generate_ids
        assert sum(1 for _ in generate_ids(ours, prompt[0].tolist(), n, temperature=0)) == n

    def decode_hf(n):
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    # ms/token of the recurrent decode = (time for 1 + decode_tokens new tokens - time for 1) / decode_tokens, the
    # two timed back to back in each round: the prompt's prefill and the first token (from the prefill logits)
    # cancel out, for both sides alike
    def per_token(gen):
        t = time.perf_counter()
        gen(1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        gen(1 + decode_tokens)
        return (time.perf_counter() - t - t1) / decode_tokens
    from .probes import memory_bandwidth_gbs
    from .roofline import bytes_per_token
    from .runtime import llama_cpp_timers
    timers = {"prefill_ours": lambda: _best_time(lambda: ours(ids), repeats=1, warmup=0),
              "prefill_hf": lambda: _best_time(lambda: hf(ids), repeats=1, warmup=0),
              "decode_ours": lambda: per_token(decode_ours), "decode_hf": lambda: per_token(decode_hf)}
    with tempfile.TemporaryDirectory() as tmp:   # llama.cpp on the same weights (f32 GGUF), if installed
        threads = torch.get_num_threads()
        os.makedirs(f"{tmp}/prefill"), os.makedirs(f"{tmp}/decode")
        pre = llama_cpp_timers(ours, "prefill", 512, threads, f"{tmp}/prefill", qtypes=("f32",))
        dec = llama_cpp_timers(ours, "decode", decode_tokens, threads, f"{tmp}/decode", qtypes=("f32",))
        if pre and dec:
            run_pre, run_dec = pre["llama.cpp F32"], dec["llama.cpp F32"]
            timers["prefill_llama"] = lambda: 512 / run_pre()
            timers["decode_llama"] = lambda: 1 / run_dec()
        best, bw = _interleave(timers, rounds, memory_bandwidth_gbs)
        del pre, dec
    t_ours, t_hf = best["prefill_ours"], best["prefill_hf"]
    d_ours, d_hf = best["decode_ours"], best["decode_hf"]
    head = cfg.padded_vocab_size * cfg.d_model
    nbytes = bytes_per_token(ours)          # weights + the recurrent state read and written: a full-logits step
    greedy_bytes = nbytes - 4 * head + head + 4 * cfg.padded_vocab_size   # ours: int8 pre-pass of the head
    floor = nbytes / (bw * 1e9)
    t_ll, d_ll = best.get("prefill_llama"), best.get("decode_llama")
    llama_pre = (f"llama.cpp f32 on the same weights {512 / t_ll:,.0f} tok/s (next-token logits only) -> ours "
                 f"{t_ll / t_ours:.2f}x" if t_ll else "llama.cpp f32 reference: 330 tok/s (llama-cpp-python not installed)")
    llama_dec = (f"llama.cpp f32 on the same weights {d_ll * 1e3:.1f} ms/token (full logits) -> ours "
                 f"{d_ll / d_ours:.2f}x" if d_ll else "llama.cpp f32 reference: 41 tok/s (llama-cpp-python not installed)")
    log(f"130m prefill 1x512: ours {512 / t_ours:,.0f} tok/s ({t_ours:.2f} s, all logits), transformers "
        f"{512 / t_hf:,.0f} tok/s ({t_hf:.2f} s) -> {t_hf / t_ours:.2f}x  [{llama_pre}]")
    log(f"130m decode (greedy generate after an 8-token prompt, prefill excluded): ours {d_ours * 1e3:.1f} ms/token "
        f"({1 / d_ours:.1f} tok/s), transformers {d_hf * 1e3:.1f} ms/token -> {d_hf / d_ours:.2f}x  "
        f"[{llama_dec}]  (best of {rounds} rounds)")
    log(f"130m decode is memory-bound: a full-logits fp32 step reads {nbytes / 1e6:.0f} MB (weights, SSM state in "
        f"and out) -> at least {floor * 1e3:.1f} ms/token at the {bw:.1f} GB/s measured now ({d_hf / floor:.2f}x "
        f"transformers); greedy decoding here reads an int8 copy of the head plus the few rows it rescores exactly "
        f"({greedy_bytes / 1e6:.0f} MB, same tokens): {greedy_bytes / d_ours / 1e9:.1f} GB/s")
    return {"prefill_ours_tok_s": 512 / t_ours, "prefill_transformers_tok_s": 512 / t_hf,
            "decode_ours_ms": d_ours * 1e3, "decode_transformers_ms": d_hf * 1e3, "bandwidth_gbs": bw,
            "decode_bytes_per_token_full_logits": nbytes, "decode_bytes_per_token_greedy": greedy_bytes,
            "decode_floor_full_logits_ms": floor * 1e3,
            "prefill_llama_cpp_f32_tok_s": 512 / t_ll if t_ll else None,
            "decode_llama_cpp_f32_ms": d_ll * 1e3 if d_ll else None}


# where a training step's time goes: profiler events (self CPU time) grouped by what they are
_PROFILE_GROUPS = (
    ("GEMMs (projections, lm_head; fwd+bwd)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("SSD scan, C (fwd+bwd)", ("_SSDTrain",)),
    ("conv + SiLU, C (fwd+bwd)", ("_ConvSiLU",)),
    ("gated RMSNorm, C (fwd+bwd)", ("_GatedNorm",)),
    ("block RMSNorm, C (fwd+bwd)", ("_RMSNorm",)),
    ("cross-entropy, C (fwd+bwd)", ("_CrossEntropy",)),
    ("AdamW (fused)", ("aten::_fused_adamw_",)),
    ("cat (in_proj's split, backward)", ("aten::cat",)),
)


def profile_training(log, steps: int = 3, chunk: int = 32, preset: str = "bench-5m", batch: int = 8,
                     seq: int = 256) -> dict:
    """Self CPU time of our training step (the benchmark's shape) by component, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    cfg = Mamba2Config(**{**PRESETS[preset], "chunk_size": chunk})
    step = _train_step(Mamba2LM(cfg), cfg.vocab_size, batch, seq)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    shares = {}
    for label, prefixes in _PROFILE_GROUPS:
        shares[label] = sum(v for k, v in self_us.items() if k.startswith(prefixes))
    shares["everything else (small ops, autograd)"] = total - sum(shares.values())
    log(f"training step profile ({preset}, {batch}x{seq}, chunk {chunk}; {total / steps / 1e3:.0f} ms per profiled "
        f"step, self CPU time):")
    for label, us in shares.items():
        log(f"  {label:<42} {us / steps / 1e3:7.1f} ms  {100 * us / total:5.1f} %")
    return {label: us / total for label, us in shares.items()}


def run_bench_model(cfg) -> None:
    from ..ops.device import cpu_description
    from .runtime import llama_cpp_version
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "machine": cpu_description(), "llama_cpp": llama_cpp_version()}
    say(f"machine: {out['machine']}; threads {out['threads']}; {out['llama_cpp']}")
    out["training"] = bench_training(say, rounds=cfg.rounds)
    if cfg.profile:
        out["training_profile"] = profile_training(say)
    if not cfg.skip_130m:
        out["mamba2_130m"] = bench_130m(say, rounds=cfg.rounds)
        if cfg.profile:
            from .runtime import decode_profile, load_bench_model
            phases = decode_profile(load_bench_model("mamba2-130m"), 32)
            if phases:
                say("130m decode step profile (fp32, full logits; ms/token): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
                out["decode_profile_ms"] = phases
    if cfg.json:
        from ..formats.fs import atomic_write_bytes
        atomic_write_bytes(cfg.json, (json.dumps(out, indent=2) + "\n").encode())
        say(f"wrote {cfg.json}")


def run_bench_qat(cfg) -> None:
    """Cost of one QAT+KD step (frozen teacher forward + ternary student forward/backward) relative
    to one plain training step of the same model without teacher or quantization."""
    import copy

    from ..quant.qat import TernaryConfig, quantize_
    from ..train.distill import DistillObjective
    torch.manual_seed(0)
    if cfg.model not in PRESETS:
        raise UserError(f"--model-config {cfg.model}: choose a preset ({', '.join(PRESETS)})")
    mcfg = Mamba2Config(**{**PRESETS[cfg.model], "chunk_size": 64})
    plain = Mamba2LM(mcfg)
    teacher = copy.deepcopy(plain).eval()
    student = copy.deepcopy(plain)
    quantize_(student, TernaryConfig(group_size=DEFAULT_GROUP_SIZE, scale_mode=cfg.scale_mode))
    obj = DistillObjective(teacher)
    ids = torch.randint(0, mcfg.vocab_size, (8, 257))
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)
    opt_s = torch.optim.AdamW(obj.param_groups(student), lr=1e-4, fused=True)

    def plain_step():
        next_token_loss(plain, ids).backward()
        opt_p.step()
        opt_p.zero_grad()

    def qat_step():
        obj.loss(student, ids)[0].backward()
        opt_s.step()
        opt_s.zero_grad()
    t_plain = min(_best_time(plain_step), _best_time(plain_step))
    t_qat = min(_best_time(qat_step), _best_time(qat_step))
    say(f"{cfg.model} ({mcfg.n_params / 1e6:.1f} M params), batch 8x256: plain step {t_plain * 1e3:.0f} ms, "
          f"QAT+KD step ({cfg.scale_mode} scales) {t_qat * 1e3:.0f} ms -> {t_qat / t_plain:.2f}x  [target <= 1.5x]")
