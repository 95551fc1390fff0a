"""`ternary-mamba bench ops`: every op's dispatcher against its `*_ref` at a model's real shapes, on this device:
which implementation ran, the largest difference of the output and of every gradient, and the time of each (forward
+ backward where the op trains).  The one table that says whether a fused path is right and worth it (on a GPU
with `--device cuda`; on a CPU the C kernels)."""
from __future__ import annotations

import time

import torch

from ..core.config import PRESETS, Mamba2Config
from ..errors import UserError
from ..ops import conv, losses, norms, scan
from ..ops.dispatch import last_impl
from ..quant import ternary as tq
from ..spec import DEFAULT_GROUP_SIZE
from ..log import say


def _inputs(cfg: Mamba2Config, batch: int, seq: int, dev: torch.device, g: torch.Generator):
    """(name, fast, ref, args, grad arg indices) at the shapes one mixer of `cfg` sees."""
    r = lambda *s: torch.randn(*s, generator=g).to(dev)    # noqa: E731
    h, p, ng, n, cd = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.conv_dim
    dims = scan.ScanDims(h, p, ng, n, cfg.chunk_size)
    dt = (torch.rand(batch, seq, h, generator=g) * 0.1 + 0.001).to(dev)
    A = -(torch.rand(h, generator=g) * 15 + 1).to(dev)
    V = cfg.padded_vocab_size
    G = DEFAULT_GROUP_SIZE if cfg.d_model % DEFAULT_GROUP_SIZE == 0 else cfg.d_model
    w = r(cfg.d_in_proj, cfg.d_model) * 0.02
    return [
        ("ssd_scan", scan.ssd_scan, scan.ssd_scan_ref, (r(batch, seq, cd), dt, A, r(h), dims), (0, 1, 3)),
        ("conv_silu", conv.conv_silu, conv.conv_silu_ref, (r(batch, seq, cd), r(cd, 1, cfg.d_conv) * 0.5, r(cd), None),
         (0, 1, 2)),
        ("gated_norm", norms.gated_norm, norms.gated_norm_ref,
         (r(batch, seq, cfg.d_inner), r(batch, seq, cfg.d_inner), r(cfg.d_inner), ng, cfg.norm_eps), (0, 1, 2)),
        ("rms_norm", norms.rms_norm, norms.rms_norm_ref, (r(batch, seq, cfg.d_model), r(cfg.d_model), cfg.norm_eps),
         (0, 1)),
        ("fake_quant", tq.fake_quant, tq.fake_quant_ref, (w, tq.absmean_scale(w, G), G, True, "bf16"), (0, 1)),
        ("kl_div", losses.kl_div, losses.kl_div_ref, (r(batch * min(seq, 256), V), r(batch * min(seq, 256), V), 1.0),
         (1,)),
        ("cross_entropy", losses.cross_entropy, losses.cross_entropy_ref,
         (r(batch * min(seq, 256), V), torch.randint(0, V, (batch * min(seq, 256),), generator=g).to(dev)), (0,)),
    ]


def _run(fn, args, grads: tuple[int, ...], train: bool):
    xs = [a.clone().requires_grad_(train and i in grads) if isinstance(a, torch.Tensor) else a
          for i, a in enumerate(args)]
    with torch.set_grad_enabled(train):
        out = fn(*xs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
        gs = []
        if train:
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
            gs = list(torch.autograd.grad(loss, [xs[i] for i in grads], allow_unused=True))
    return [o.detach() for o in outs], gs


def _time(fn, args, grads, train, device, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run(fn, args, grads, train)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _maxdiff(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("nan")
    return float((a.float() - b.float()).abs().max())


def run_bench_ops(cfg) -> dict:
    if cfg.model not in PRESETS:
        raise UserError(f"--model-config {cfg.model}: choose a preset ({', '.join(PRESETS)})")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    mcfg = Mamba2Config(**PRESETS[cfg.model])
    if cfg.chunk_size:
        mcfg = mcfg.replace(chunk_size=cfg.chunk_size)
    g = torch.Generator().manual_seed(0)
    rows = []
    say(f"ops at {cfg.model} shapes, batch {cfg.batch_size} x {cfg.seq_len}, on {device} (best of {cfg.rounds})")
    say(f"{'op':<14} {'pass':<8} {'impl':<10} {'max |out diff|':>15} {'max |grad diff|':>16} {'fast ms':>9} "
          f"{'ref ms':>9} {'speed-up':>9}")
    for name, fast, ref, args, grads in _inputs(mcfg, cfg.batch_size, cfg.seq_len, device, g):
        for train in (False, True):
            out_f, g_f = _run(fast, args, grads, train)
            impl = last_impl(name) or "?"
            out_r, g_r = _run(ref, args, grads, train)
            row = {"op": name, "pass": "train" if train else "forward", "impl": impl,
                   "out_diff": max(_maxdiff(a, b) for a, b in zip(out_f, out_r)),
                   "grad_diff": max((_maxdiff(a, b) for a, b in zip(g_f, g_r)), default=0.0),
                   "fast_ms": 1e3 * _time(fast, args, grads, train, device, cfg.rounds),
                   "ref_ms": 1e3 * _time(ref, args, grads, train, device, cfg.rounds)}
            rows.append(row)
            say(f"{name:<14} {row['pass']:<8} {impl:<10} {row['out_diff']:>15.2e} "
                  f"{row['grad_diff'] if train else float('nan'):>16.2e} {row['fast_ms']:>9.2f} {row['ref_ms']:>9.2f} "
                  f"{row['ref_ms'] / max(row['fast_ms'], 1e-9):>8.2f}x", flush=True)
    out = {"model": cfg.model, "device": str(device), "batch": cfg.batch_size, "seq_len": cfg.seq_len, "ops": rows}
    if cfg.json:
        from ..formats.fs import write_json_atomic
        write_json_atomic(cfg.json, out)
        say(f"wrote {cfg.json}")
    return out
