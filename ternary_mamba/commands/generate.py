"""`ternary-mamba generate`: stream a continuation of a prompt from any model the package loads."""
from __future__ import annotations

import sys
import time

from ..errors import UserError
from ..runtime.load import load_for_decoding
from ..ops.device import autocast, precision
from ..runtime.generate import generate_text
from ..runtime.heads import use_int8_head
from ..runtime.modes import select_mode
from ..runtime.packed_linear import use_a8_activations, use_bf16_activations
from .configs import GenerateConfig
from .flags import require


def generate(cfg: GenerateConfig, stream: bool = False) -> str:
    """The generated continuation of `cfg.prompt` (printed as it decodes with stream=True, as the CLI does).
    The Python twin of `ternary-mamba generate`."""
    require(cfg, "model", "prompt", command="generate")
    device, dtype = precision(cfg.device, cfg.dtype)
    model, tok, note = load_for_decoding(cfg.model, cfg.tokenizer)
    model = model.to(device)
    if stream and note:
        print(f"[{note}]", file=sys.stderr)
    if cfg.threads is None and device.type == "cpu":
        from ..ops.build import set_threads
        from ..ops.threads import default_threads
        n, why = default_threads(sum(p.numel() for p in model.parameters()) +
                                 sum(b.numel() for b in model.buffers()))
        set_threads(n)
        if stream:
            print(f"[threads: {why}]", file=sys.stderr)
    explicit = cfg.int8_head or cfg.a8 or cfg.a16
    if explicit and cfg.mode not in ("auto", "exact") or explicit and cfg.exact:
        raise UserError("--int8-head / --a8 / --a16 set a mode of their own: leave out --mode / --exact")
    if not explicit:
        why = select_mode(model, cfg.model, "exact" if cfg.exact else cfg.mode)
        if stream and why:
            print(f"[decode mode: {why}]", file=sys.stderr)
    if cfg.int8_head:
        use_int8_head(model)
    if cfg.a8 and use_a8_activations(model) == 0:
        print("--a8: no packed projections with groups of a multiple of 128; nothing changed", file=sys.stderr)
    if cfg.a8 and cfg.a16:
        raise UserError("--a8 and --a16: choose one activation precision")
    if cfg.a16 and use_bf16_activations(model) == 0:
        print("--a16: needs packed projections with groups of a multiple of 64 and a CPU with AVX512-BF16; "
              "decoding with exact fp32 activations", file=sys.stderr)
    on_text = None
    if stream:
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
        on_text = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    t0 = time.perf_counter()
    with autocast(device, dtype):
        text = generate_text(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                             on_text=on_text)
    if stream:
        dt = time.perf_counter() - t0
        n = len(tok.encode(text))
        print(f"\n[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tok/s incl. prefill]", file=sys.stderr)
    return text
