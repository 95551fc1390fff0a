"""`ternary-mamba info`: a preset, config file, model / run / packed folder or GGUF file at a glance."""
from __future__ import annotations

from pathlib import Path

from ..core.config import MB, PRESETS, Mamba2Config
from ..errors import UserError
from ..formats.configs import PACKED_FORMAT_NAME, config_from_json
from ..formats.fs import read_json
from ..formats.paths import is_gguf, resolve_student_dir
from ..formats.sizes import format_info, format_size_table, packed_info
from ..runtime.modes import describe_record, read_gguf_record, read_record
from ..spec import DEFAULT_GROUP_SIZE
from .flags import require
from ..log import say


def run_results(run: Path) -> str:
    """A run folder's final summary (the table `quantize` / `pretrain` printed), or its progress so far."""
    from ..formats.fs import read_json
    from ..formats.records import read_summary
    lines = [f"run: {run}"]
    if (run / "summary.json").exists():
        s = read_summary(run / "summary.json")
        for name, r in (s.get("rows") or {}).items():
            z = f", zero ratio {r['zero_ratio']:.3f}" if "zero_ratio" in r else ""
            lines.append(f"  {name:<30} held-out ppl {r['ppl']:.2f}, KL {r['kl']:.4f}, top-1 {r['top1_agree']:.3f}{z}")
        if "heldout_ppl" in s:
            lines.append(f"  held-out ppl {s['heldout_ppl']:.2f} over {s.get('heldout_tokens', 0):,} tokens")
        lines.append(f"  tokens trained: {s.get('tokens', 0):,}")
    elif (run / "checkpoint" / "trainer_state.json").exists():
        st = read_json(run / "checkpoint" / "trainer_state.json")
        lines.append(f"  in progress (or stopped): last checkpoint at step {st.get('step')}; --resume continues it")
    return "\n".join(lines)


def info(path: str) -> str:
    if path in PRESETS:   # the config and what each packed layout of it would store
        cfg = Mamba2Config(**PRESETS[path])
        return format_info(cfg, path) + "\npacked sizes:\n" + format_size_table(cfg, DEFAULT_GROUP_SIZE)
    p = Path(path)
    if is_gguf(p):
        from ..formats.gguf_load import gguf_summary
        cfg, types = gguf_summary(p)
        kinds = ", ".join(f"{n} x{k}" for n, k in sorted(types.items(), key=lambda kv: -kv[1]))
        ternary = any(k in types for k in ("TQ2_0", "TQ1_0"))
        return (format_info(cfg, str(p)) + f"\nGGUF file: {p.stat().st_size / MB:,.2f} MB; tensors: {kinds} "
                f"(TQ2_0 / TQ1_0 projections decode packed: `generate`, `serve`)"
                + ("\n" + describe_record(read_gguf_record(p)) if ternary else ""))
    if p.is_file():
        return format_info(config_from_json(p), str(p))
    run = Path(path) if (Path(path) / "run.json").exists() else None
    if run is not None and not any((run / d / "config.json").exists() for d in ("student", "model")):
        return run_results(run)
    folder = resolve_student_dir(path)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json")
    meta = read_json(folder / "config.json")
    cfg = config_from_json(folder / "config.json")
    if meta.get("format") == PACKED_FORMAT_NAME and (folder / "model.safetensors").exists():
        return format_info(cfg, str(folder)) + "\n" + packed_info(folder) + "\n" + describe_record(read_record(folder))
    q = meta.get("quantization")
    try:
        sizes = format_size_table(cfg, q["group_size"] if q else DEFAULT_GROUP_SIZE)
    except UserError as e:   # a model too narrow for the default group: no packed sizes to show
        sizes = f"packed sizes: not shown ({e})"
    results = "\n" + run_results(run) if run is not None else ""
    return format_info(cfg, str(folder)) + "\n" + sizes + results


def info_command(cfg) -> str:
    """`ternary-mamba info PATH`: prints and returns `info(cfg.path)` (cfg: commands.tool_configs.InfoConfig)."""
    require(cfg, "path", command="info")
    out = info(cfg.path)
    say(out)
    return out
