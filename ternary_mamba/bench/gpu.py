"""`ternary-mamba bench gpu`: QAT+KD training steps of the real configs on one CUDA GPU, through the real
Trainer (bf16 autocast, fp32 master weights, fused AdamW), with random weights (no hub needed).  Per setting:
step time, tokens/s, the MFU against a bf16 GEMM measured in the same run, the hours 102 M tokens would take,
and the measured peak memory beside `plan`'s prediction.  The first setting is also timed on the PyTorch
reference path (no Triton kernels), as the ratio that shows what the kernels buy."""
from __future__ import annotations

import contextlib
import copy
import tempfile
import time

import numpy as np
import torch

from ..core.config import PRESETS, Mamba2Config
from ..core.model import Mamba2LM
from ..errors import UserError
from ..log import say

PAPER_TOKENS = 102_000_000


def bf16_gemm_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def _setting(preset: str, batch: int, seq: int, checkpointing: bool, steps: int, reference: bool = False,
             device: str = "cuda", profile: bool = False, chunk_size: int | None = None) -> dict:
    """One setting's timed steps (`device` "cpu" only for the test of this function: no peak memory there)."""
    from ..ops.dispatch import reference_path
    from ..quant.qat import TernaryConfig, quantize_
    from ..train.checkpointing import checkpoint_blocks_
    from ..train.config import TrainConfig
    from ..train.data import PackedSequences
    from ..train.distill import DistillObjective, frozen_teacher
    from ..train.loop import Trainer
    from ..train.memory import plan_memory, qat_kd_flops_per_token
    from ..spec import DEFAULT_GROUP_SIZE
    cfg = Mamba2Config(**{**PRESETS[preset], **({"chunk_size": chunk_size} if chunk_size else {})})
    q = TernaryConfig(group_size=DEFAULT_GROUP_SIZE, scale_mode="learned", scale_format="bf16")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with dev:
        teacher = Mamba2LM(cfg)
    student = copy.deepcopy(teacher)
    teacher = frozen_teacher(teacher, dev, torch.bfloat16)
    quantize_(student, q)
    if checkpointing:
        checkpoint_blocks_(student)
    rng = np.random.default_rng(0)
    data = PackedSequences(rng.integers(0, cfg.vocab_size, (batch * (steps + 2) * (seq + 1),), dtype=np.uint16), seq)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(tokens=batch * seq * (steps + 2), seq_len=seq, batch_size=batch, eval_every=0)
        trainer = Trainer(student.train(), DistillObjective(teacher, alpha_ce=0.5), tc, tmp, data, None,
                          verbose=False, device=dev, dtype=torch.bfloat16)
        ctx = reference_path() if reference else contextlib.nullcontext()
        with ctx:
            for i in range(steps + 2):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                rec = trainer.train_step()
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:          # the first two compile the Triton kernels and warm the allocator
                    times.append(time.perf_counter() - t)
            prof = _profile_step(trainer) if profile and cuda else None
    measured = torch.cuda.max_memory_allocated() if cuda else float("nan")
    planned = plan_memory(cfg, q, batch, seq, "bf16", 1, False, checkpointing, "cuda", () if reference else None).peak
    step = float(np.median(times))
    flops = qat_kd_flops_per_token(cfg, checkpointing) * batch * seq
    del trainer, student, teacher
    if cuda:
        torch.cuda.empty_cache()
    return {"preset": preset, "batch": batch, "seq_len": seq, "checkpointing": checkpointing, "chunk_size": cfg.chunk_size,
            "path": "reference (PyTorch)" if reference else "Triton kernels", "step_s": step,
            "tok_s": batch * seq / step, "tflops": flops / step / 1e12, "loss": rec["loss"],
            "peak_gb": measured / 1e9, "planned_gb": planned / 1e9, "hours_102m": PAPER_TOKENS / (batch * seq / step) / 3600,
            **({"profile": prof} if prof else {})}


def _predicted(preset: str, batch: int, seq: int, ckpt: bool, reference: bool, kind: str | None,
               chunk_size: int | None) -> float | None:
    """What `plan`'s cost model predicts for this setting on this GPU kind (the reference path: no fused kernel),
    printed beside the measurement so that every run checks the model."""
    if kind is None:
        return None
    from ..quant.qat import TernaryConfig
    from ..spec import DEFAULT_GROUP_SIZE, GPUS
    from ..train.costmodel import predict_step
    from ..train.standins import FUSED
    cfg = Mamba2Config(**{**PRESETS[preset], **({"chunk_size": chunk_size} if chunk_size else {})})
    q = TernaryConfig(group_size=DEFAULT_GROUP_SIZE, scale_mode="learned", scale_format="bf16")
    return predict_step(cfg, q, batch, seq, GPUS[kind], "bf16", ckpt, () if reference else FUSED).tok_s


def _profile_step(trainer, top: int = 12) -> dict:
    """One more step under torch.profiler: the GPU kernels, and the PyTorch ops (with their input shapes) that
    launched them, with the most GPU time and their share of the step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        trainer.train_step()
        torch.cuda.synchronize()

    def table(events, name):
        events = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
        total = sum(e.self_device_time_total for e in events)
        events.sort(key=lambda e: -e.self_device_time_total)
        return [{"name": name(e), "ms": e.self_device_time_total / 1e3, "share": e.self_device_time_total / total,
                 "calls": e.count} for e in events[:top]]
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    return {"kernels": table(kernels, lambda e: e.key[:90]),
            "ops": table(ops, lambda e: f"{e.key} {str(e.input_shapes)[:80]}")}


def run_bench_gpu(cfg) -> None:
    if not torch.cuda.is_available():
        raise UserError("no CUDA device is visible: this benchmark runs on a GPU")
    for m in cfg.models:
        if m not in PRESETS:
            raise UserError(f"--models {m}: not a preset ({', '.join(p for p in PRESETS if p.startswith('mamba2'))})")
    from ..commands.configs import GPU_PEAK_TFLOPS
    name = torch.cuda.get_device_name(0)
    peak = bf16_gemm_tflops()
    # `plan --mfu` is a fraction of the vendor's nominal peak; the MFU column below is against the measured GEMM
    kind = next((k for k in GPU_PEAK_TFLOPS if k.replace("rtx", "") in name.lower()), None)
    nominal = GPU_PEAK_TFLOPS[kind][0] if kind else None
    say(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; bf16 GEMM 8192^3 measured "
          f"{peak:.0f} TFLOP/s" + (f" (nominal {nominal:.0f}: `plan --gpu {kind}`)" if nominal else ""))
    out = {"device": name, "torch": torch.__version__, "bf16_gemm_tflops": peak, "nominal_tflops": nominal,
           "settings": []}
    plans = []   # (preset, micro-batch, seq-len, checkpointing, reference path)
    for m in cfg.models:
        big = Mamba2Config(**PRESETS[m]).d_model >= 2048
        plans += [(m, 1 if big else 8, cfg.seq_len, False, False)]
        if big:
            plans += [(m, 8, cfg.seq_len, True, False)]
    if plans:
        plans.insert(1, (*plans[0][:4], True))      # the first setting again on the reference path
    say(f"{'model':<13} {'micro-batch':>12} {'ckpt':>5} {'path':<20} {'step s':>7} {'tok/s':>9} {'MFU':>6} "
          f"{'peak GB':>8} {'plan GB':>8} {'102M tok':>9} {'--mfu':>6} {'predicted':>10}")
    for p in plans:
        preset, batch, seq, ck, ref = p
        try:
            r = _setting(preset, batch, seq, ck, cfg.steps, reference=ref,
                         profile=cfg.profile and p is plans[-1], chunk_size=cfg.chunk_size)
        except torch.cuda.OutOfMemoryError:
            say(f"{preset:<13} {batch:>5} x {seq:<5} {'yes' if ck else 'no':>5}  out of memory")
            torch.cuda.empty_cache()
            continue
        r["mfu"] = r["tflops"] / peak
        r["plan_mfu"] = r["tflops"] / nominal if nominal else None    # what `plan --mfu` takes
        r["predicted_tok_s"] = _predicted(preset, batch, seq, ck, ref, kind, cfg.chunk_size)
        out["settings"].append(r)
        say(f"{preset:<13} {batch:>5} x {seq:<5} {'yes' if ck else 'no':>5} {r['path']:<20} {r['step_s']:>7.3f} "
              f"{r['tok_s']:>9,.0f} {100 * r['mfu']:>5.1f}% {r['peak_gb']:>8.1f} {r['planned_gb']:>8.1f} "
              f"{r['hours_102m']:>8.1f}h {r['plan_mfu'] or float('nan'):>6.3f} "
              f"{r['predicted_tok_s'] or float('nan'):>10,.0f}", flush=True)
    if nominal:
        say(f"MFU: against the GEMM measured above; `plan --gpu {kind} --mfu` takes the fraction of the nominal "
              f"{nominal:.0f} TFLOP/s, the last column")
    for r in out["settings"]:
        if "profile" in r:
            say(f"\nwhere a {r['preset']} step's GPU time goes ({r['batch']} x {r['seq_len']}, "
                  f"{'checkpointing' if r['checkpointing'] else 'no checkpointing'}):")
            for what in ("kernels", "ops"):
                say(f"  by {'GPU kernel' if what == 'kernels' else 'PyTorch op (input shapes)'}:")
                for k in r["profile"][what]:
                    say(f"  {100 * k['share']:5.1f}%  {k['ms']:8.1f} ms  {k['calls']:>6}x  {k['name']}")
    if cfg.json:
        from ..formats.fs import write_json_atomic
        write_json_atomic(cfg.json, out)
        say(f"wrote {cfg.json}")
