"""Hugging Face out: a `transformers` `Mamba2ForCausalLM` folder, and the model card every export writes.

`export --format hf` writes config.json in transformers' Mamba2 fields, model.safetensors with transformers' key
names (the ternary projections dequantized from their codes: s·t, exact in fp32 and fp16, and in bf16 for
bf16-format scales), the tokenizer, and README.md.  `from_pretrained` loads it with no ternary-mamba installed;
the logits equal ours (tests/test_ecosystem.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..core.config import MB, count_params_by_component
from ..errors import UserError
from ..quant.qat import TernaryLinear
from .folders import model_state_for_saving
from .fs import atomic_dir, save_safetensors

HF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def hf_config(cfg, dtype: str) -> dict:
    """Our Mamba2Config as transformers' Mamba2Config fields."""
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.padded_vocab_size, "state_size": cfg.d_state,
            "head_dim": cfg.headdim, "num_heads": cfg.nheads, "n_groups": cfg.ngroups, "expand": cfg.expand,
            "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size, "use_conv_bias": cfg.conv_bias,
            "use_bias": cfg.bias, "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "rms_norm": True, "norm_before_gate": False, "residual_in_fp32": True,
            "time_step_limit": [0.0, float("inf")], "torch_dtype": {"fp16": "float16", "bf16": "bfloat16",
                                                                      "fp32": "float32"}[dtype]}


def _dense_state(model) -> dict[str, torch.Tensor]:
    """Every tensor under transformers' names; ternary projections as their dequantized weights."""
    sd = model_state_for_saving(model)
    for name, m in model.named_modules():
        if isinstance(m, TernaryLinear):
            if m.has_corrections:
                raise UserError("this model carries post-hoc corrections (bias / low-rank), which a plain "
                                "Mamba2ForCausalLM does not hold")
            codes, s16 = m.export()
            G = m.group_size
            w = (codes.float().view(m.out_features, -1, G) * s16.float()[..., None]).view(m.out_features, -1)
            for k in (f"{name}.weight", f"{name}.scale", f"{name}.log_scale", f"{name}.corr_bias", f"{name}.corr_u", f"{name}.corr_v"):
                sd.pop(k, None)
            sd[f"{name}.weight"] = w
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}


def _source_name(source: str) -> str:
    """The folder a model came from, by name only (a card names no path of the machine it was made on)."""
    path, _, note = source.partition(" (")
    return f"`{Path(path).name}`" + (f" ({note}" if note else "")


def card_metadata(fmt: str, base_model: str | None) -> str:
    """The card's YAML metadata, made by huggingface_hub's ModelCardData when it is installed (the hub's own
    schema and field names), else the same fields by hand.  base_model is a hub id or absent, never a path."""
    fields = {"library_name": "transformers" if fmt == "hf" else "ternary-mamba",
              "tags": ["mamba2", "ternary", "quantization", "w1.58a16", "ternary-mamba"]}
    if base_model and base_model.count("/") == 1 and not base_model.startswith((".", "/")):
        fields["base_model"] = base_model
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        import yaml
        return yaml.safe_dump(fields, sort_keys=False)
    return ModelCardData(**fields).to_yaml()


def model_card(model, source: str, fmt: str, extra: dict | None = None) -> str:
    """README.md for an exported model: what it is, how it was made, what it measured, how big it is."""
    cfg, q = model.config, getattr(model, "ternary_config", None) or getattr(model, "converted_from", None)
    n = sum(count_params_by_component(cfg).values())
    e = extra or {}
    lines = ["---", card_metadata(fmt, e.get("base_model")).strip(), "---", "",
             f"# {Path(source).name} — ternary Mamba-2 ({fmt})", "",
              f"A Mamba-2 ({n / 1e6:,.1f} M parameters, d_model {cfg.d_model}, {cfg.n_layer} layers) whose "
              "in_proj / out_proj weights are ternary, {-1, 0, +1} x one scale per group (W1.58A16), made with "
              "[ternary-mamba](https://pypi.org/project/ternary-mamba/) by grouped quantization-aware training "
              "with knowledge distillation from the full-precision teacher.", "",
              "| | |", "|---|---|", f"| source | {_source_name(source)} |", f"| format | {fmt} |"]
    if q is not None:
        lines += [f"| group size | {q.group_size} |", f"| scales | {q.scale_mode} ({q.scale_format}) |"]
    for k in ("base_model", "teacher", "tokens", "heldout_ppl", "teacher_ppl", "kl_to_teacher", "zero_ratio",
              "size_mb"):
        if e.get(k) is not None:
            v = e[k]
            lines.append(f"| {k.replace('_', ' ')} | {v:,.4g} |" if isinstance(v, float) else f"| {k.replace('_', ' ')} | {v:,} |"
                         if isinstance(v, int) else f"| {k.replace('_', ' ')} | {v} |")
    if fmt == "hf":
        lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)   # the ternary weights, dequantized", "```"]
    return "\n".join(lines) + "\n"


def card_facts(folder: Path | None) -> dict:
    """What a run folder's summary.json knows, for the card (nothing when there is none)."""
    if folder is None:
        return {}
    base = {}
    try:
        t = json.loads((Path(folder) / "config.json").read_text()).get("teacher")
        # base_model is hub metadata: a hub id or nothing (a local teacher is named in the card's table instead)
        if isinstance(t, str) and t:
            base = ({"base_model": t} if t.count("/") == 1 and not Path(t).exists() and not t.startswith((".", "/"))
                    else {"teacher": Path(t).name})
    except (OSError, ValueError):
        pass
    for s in (Path(folder) / "summary.json", Path(folder).parent / "summary.json"):
        if s.exists():
            try:
                d = json.loads(s.read_text())
            except (OSError, ValueError):
                return {}
            rows = d.get("rows", {})
            student = next((v for k, v in rows.items() if k.startswith("QAT")), {})
            teacher = next((v for k, v in rows.items() if k.startswith("teacher")), {})
            return {**base, "tokens": d.get("tokens"), "heldout_ppl": student.get("ppl"),
                    "teacher_ppl": teacher.get("ppl"), "kl_to_teacher": student.get("kl"),
                    "zero_ratio": student.get("zero_ratio")}
    return base


def export_hf(model, out: Path, dtype: str = "fp16", tokenizer_path: Path | None = None, source: str = "",
              facts: dict | None = None) -> Path:
    """Write a transformers Mamba2ForCausalLM folder (atomically)."""
    if dtype not in HF_DTYPES:
        raise UserError(f"--hf-dtype {dtype}: choose one of {', '.join(HF_DTYPES)}")
    sd = {k: v.to(HF_DTYPES[dtype]).contiguous() for k, v in _dense_state(model).items()}
    with atomic_dir(Path(out)) as tmp:
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, dtype), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        size = (tmp / "model.safetensors").stat().st_size / MB
        (tmp / "README.md").write_text(model_card(model, source, "hf", {**(facts or {}), "size_mb": round(size, 2)}))
    return Path(out)
