"""`ternary-mamba plan`: memory per GPU and hours for a QAT+KD run, before renting the GPUs."""
from __future__ import annotations

from pathlib import Path

from ..core.config import PRESETS, Mamba2Config, count_params_by_component
from ..errors import UserError
from ..formats.configs import config_from_json
from ..formats.paths import resolve_model_dir
from ..quant.config import TernaryConfig
from ..train.memory import plan_memory, qat_kd_flops_per_token
from ..spec import GPUS
from .configs import PlanConfig
from ..log import say

GB = 1e9


def model_config(spec: str) -> Mamba2Config:
    if spec in PRESETS:
        return Mamba2Config(**PRESETS[spec])
    p = Path(spec)
    if p.is_file():
        return config_from_json(p)
    if not p.exists() and spec.count("/") == 1:      # a hub id: its config.json alone, not the weights
        try:
            from huggingface_hub import hf_hub_download
            return config_from_json(Path(hf_hub_download(spec, "config.json")))
        except ImportError:
            raise UserError(f"{spec}: huggingface_hub is not installed; pass a preset or a local config.json") from None
        except Exception as e:  # noqa: BLE001 - offline / unknown repo
            raise UserError(f"{spec}: could not fetch its config.json ({type(e).__name__}); pass a preset "
                            f"({', '.join(p for p in PRESETS if p.startswith('mamba2'))}) or a local config.json") from None
    if not p.exists() and "/" not in spec:           # a name that is not a preset
        import difflib
        close = difflib.get_close_matches(spec, list(PRESETS), n=1)
        raise UserError(f"--teacher {spec}: not a preset{f' (did you mean {close[0]}?)' if close else ''}; presets: "
                        f"{', '.join(PRESETS)}; or a model folder, config.json or hub id")
    return config_from_json(resolve_model_dir(spec) / "config.json")


def plan(cfg: PlanConfig) -> dict:
    """The memory table (bytes per GPU) and the time for `cfg.tokens`; printed, and returned as a dict."""
    mcfg = model_config(cfg.teacher)
    q = TernaryConfig(group_size=cfg.group_size, scale_mode=cfg.scale_mode,
                      scale_format="bf16" if cfg.dtype == "bf16" else "fp16")
    mem = plan_memory(mcfg, q, cfg.batch_size, cfg.seq_len, cfg.dtype, cfg.nproc, cfg.fsdp,
                      cfg.activation_checkpointing, cfg.device)
    n = sum(count_params_by_component(mcfg).values())
    gpu = None
    if cfg.device.startswith("cuda"):
        import dataclasses
        gpu = GPUS[cfg.gpu]
        if cfg.peak_tflops:
            gpu = dataclasses.replace(gpu, tensor_tflops=cfg.peak_tflops)
        peak, mem_gb = gpu.tensor_tflops, gpu.memory_gb
        where = f"{cfg.nproc} x {cfg.gpu.upper()} ({mem_gb} GB, {peak:.0f} TFLOP/s nominal, {gpu.hbm_tbps} TB/s)"
    elif cfg.device == "cpu":
        from ..ops.device import measured_gemm_tflops
        peak, mem_gb = cfg.peak_tflops or measured_gemm_tflops(cfg.dtype), None
        where = f"this CPU ({peak:.2f} TFLOP/s {cfg.dtype} GEMM measured now)"
    else:
        raise UserError(f"--device {cfg.device}: plan for cuda or cpu")
    flops = qat_kd_flops_per_token(mcfg, cfg.activation_checkpointing)
    unit = "GPU" if gpu else "process"
    lines = [f"QAT+KD plan: {cfg.teacher} ({n / 1e9:.3f} B params), {cfg.dtype}, micro-batch {cfg.batch_size} x "
             f"{cfg.seq_len} per {unit}, {where}{', FSDP' if cfg.fsdp else ''}", "", f"{'memory per ' + unit:<46} {'GB':>9}"]
    for name, b in mem.rows():
        lines.append(f"{name:<46} {b / GB:>9.2f}")
    fits = mem_gb is None or mem.peak <= mem_gb * GB * 0.92
    if mem_gb is not None:
        lines.append(f"{'fits in ' + str(mem_gb) + ' GB (8 % kept for the allocator)?':<46} {'yes' if fits else 'NO':>9}")
        if not fits:
            lines.append("  -> " + _advice(cfg, mem, mem_gb * GB * 0.92))
    lines.append("")
    conventional = None
    if gpu is not None and cfg.mfu is None:
        from ..train.costmodel import predict_step
        pred = predict_step(mcfg, q, cfg.batch_size, cfg.seq_len, gpu, cfg.dtype, cfg.activation_checkpointing)
        tok_s, conventional = pred.tok_s * cfg.nproc, pred.mfu
        hours = cfg.tokens / tok_s / 3600
        lines += [f"time (per-op cost model of the traced step): {pred.seconds:.2f} s per micro-batch -> "
                  f"{pred.tok_s:,.0f} tok/s per GPU -> {cfg.tokens / 1e6:,.0f} M tokens in {hours:.2f} h "
                  f"({hours * cfg.nproc:.2f} GPU-hours)",
                  f"model-FLOPs MFU {conventional:.1%} (8 N per token: the student's training 6 N + the teacher's "
                  f"forward 2 N, of the nominal peak); counting every traced FLOP (scan, recomputation): "
                  f"{flops * pred.tok_s / (peak * 1e12):.1%}",
                  f"bound by: {pred.bound()}",
                  *(_outlook(mcfg, q, cfg, gpu, pred) if cfg.outlook else []),
                  "not modelled: communication between GPUs (DDP overlaps it with the backward), the zero-ratio "
                  "monitor (at eval steps); `bench gpu` measures the real step"]
    else:
        mfu = cfg.mfu or 0.08
        tok_s = mfu * peak * 1e12 / flops * cfg.nproc
        hours = cfg.tokens / tok_s / 3600
        lines += [f"compute: {flops / 1e9:.2f} GFLOP per token (student fwd+bwd, teacher fwd); at {mfu:.0%} of "
                  f"peak{' (assumed; --mfu sets it)' if cfg.mfu is None else ''}: {tok_s:,.0f} tok/s -> "
                  f"{cfg.tokens / 1e6:,.0f} M tokens in {hours:.2f} h" +
                  (f" ({hours * cfg.nproc:.2f} GPU-hours)" if gpu else "")]
    lines.append("activations: traced on the meta device (on CUDA with the fused fake-quant and KD kernels and "
                 "16-bit logits; the blocks' tensors in fp32, an upper bound under autocast)")
    say("\n".join(lines))
    return {"memory_bytes": dict(mem.rows()), "fits": fits, "tok_per_s": tok_s, "hours": hours,
            "flops_per_token": flops, "model_flops_mfu": conventional}


def _outlook(mcfg, q, cfg: PlanConfig, gpu, today) -> list[str]:
    """The same step predicted with the scan's products on tensor cores: what bounds it then."""
    from ..train.costmodel import predict_step
    from ..train.standins import FUSED_TC
    p = predict_step(mcfg, q, cfg.batch_size, cfg.seq_len, gpu, cfg.dtype, cfg.activation_checkpointing, FUSED_TC)
    return [f"outlook, the scan's products on tensor cores (16-bit in, fp32 sums; the same cost model): "
            f"{p.seconds:.2f} s -> {p.tok_s:,.0f} tok/s per GPU ({p.tok_s / today.tok_s:.1f}x), model-FLOPs MFU "
            f"{p.mfu:.1%}, {cfg.tokens / p.tok_s / 3600:.2f} GPU-hours for {cfg.tokens / 1e6:,.0f} M tokens; bound "
            f"by {p.bound()}"]


def _advice(cfg: PlanConfig, mem, usable: float) -> str:
    """What to change when the plan does not fit: a smaller micro-batch, checkpointing, or sharding."""
    import math
    sharded = mem.student_weights + mem.gradients + mem.optimizer
    fixed = sharded + mem.teacher
    per_seq = (mem.activations + mem.backward_transient) / cfg.batch_size
    if fixed + per_seq <= usable:
        mb = int((usable - fixed) // per_seq)
        return f"micro-batch {mb} x {cfg.seq_len} fits (raise --grad-accum to keep the global batch)" + \
            ("" if cfg.activation_checkpointing else "; or --activation-checkpointing")
    if not cfg.activation_checkpointing:
        return "not even one sequence fits: add --activation-checkpointing"
    room = usable - mem.teacher - per_seq
    if room <= 0:
        return "one sequence's activations and the teacher alone do not fit: use a shorter --seq-len"
    ranks = math.ceil(sharded * (cfg.nproc if cfg.fsdp else 1) / room)
    return f"the fp32 weights, gradients and AdamW state alone need {fixed / GB:.1f} GB: --fsdp over >= {ranks} GPUs"
