"""One `load_model` for every path a user may hand us: the project's folders (full precision, QAT students,
packed), run folders (their finished model, or the checkpoint of one in progress), mamba_ssm and transformers
folders, GGUF files, hub ids.  The formats layer reads the files (headers and tensors); here the model is built
on the meta device, its modules swapped for the quantized or packed ones, and the tensors loaded in."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.model import Mamba2LM
from ..errors import UserError
from ..formats.configs import PACKED_FORMAT_NAME, config_from_dict
from ..formats.folders import load_state_dict_strict, read_state_dict
from ..formats.fs import read_json
from ..formats.paths import in_progress, is_gguf, resolve_student_dir


def load_checkpoint_model(run: Path):
    """The model of a run in progress, from its latest checkpoint (rebuilt from run.json: the teacher and the
    quantization of a quantize run, the model config of a pretrain run).  Says which step it is."""
    import sys
    from safetensors.torch import load_file
    from ..formats.configs import resolve_config
    rec = read_json(run / "run.json")
    c, command = rec.get("config") or {}, rec.get("command")
    if command == "quantize":
        model = load_model(c["teacher"])
        from ..quant.config import TernaryConfig
        from ..quant.qat import quantize_
        quantize_(model, TernaryConfig.from_saved(c.get("quant"), f"{run / 'run.json'}: config.quant"))
    elif command == "pretrain":
        sd = load_file(str(run / "checkpoint" / "model.safetensors"))
        cfg = resolve_config(c["model"]).replace(vocab_size=sd["backbone.embedding.weight"].shape[0])
        model = Mamba2LM(cfg, init=False)
        if c.get("ternary"):
            from ..quant.config import TernaryConfig
            from ..quant.qat import quantize_
            if "quant" in c:         # the quantization as the run recorded it (scale format included)
                quantize_(model, TernaryConfig.from_dict(c["quant"], f"{run / 'run.json'}: config.quant"))
            else:                    # run records written before pretrain nested its TernaryConfig (flat fields)
                quantize_(model, TernaryConfig.from_dict(
                    {k: c[k] for k in ("group_size", "scale_mode", "scale_param") if k in c},
                    f"{run / 'run.json'}: config"))
    else:
        raise UserError(f"{run}: run.json names no known command; cannot rebuild its model")
    load_state_dict_strict(model, load_file(str(run / "checkpoint" / "model.safetensors")), str(run / "checkpoint"))
    step = read_json(run / "checkpoint" / "trainer_state.json").get("step")
    print(f"({run}: a run in progress; using its checkpoint at step {step})", file=sys.stderr)
    return model.eval()


def load_model(path_or_id: str | os.PathLike, device: str = "cpu"):
    """Any supported checkpoint -> an fp32 `Mamba2LM` in eval mode: a model folder, a run folder (its
    finished student/ or model/), a packed folder (ternary weights stay packed), a QAT student (its ternary
    modules rebuilt), a .gguf file, or a hub id."""
    if is_gguf(path_or_id):
        from ..formats.gguf_load import load_gguf
        return load_gguf(Path(path_or_id)).to(device)
    if in_progress(path_or_id) is not None:
        return load_checkpoint_model(Path(path_or_id)).to(device)
    folder = resolve_student_dir(path_or_id)
    meta = read_json(folder / "config.json")
    if meta.get("format") == PACKED_FORMAT_NAME:
        from .packed_model import load_packed
        return load_packed(folder).to(device)
    cfg = config_from_dict(meta, str(folder / "config.json"))
    with torch.device("meta"):
        model = Mamba2LM(cfg, init=False)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    sd = read_state_dict(folder)
    quant = meta.get("quantization")
    if quant:  # a QAT student: rebuild its ternary modules before loading latent weights + scales
        from ..quant.qat import TernaryConfig, quantize_
        quantize_(model, TernaryConfig.from_saved(quant, f"{folder / 'config.json'}: quantization"))
    load_state_dict_strict(model, sd, str(folder))
    return model.to(device).eval()


def load_model_and_tokenizer(path: str | os.PathLike, tokenizer: str | None = None):
    """(model, tokenizer) of a model / run / packed folder, the bundled teacher, a hub id or a .gguf file (its
    embedded tokenizer unless `tokenizer` is given)."""
    from ..formats.tokenizer import load_tokenizer, tokenizer_path_for
    if is_gguf(path):
        from ..formats.gguf_load import load_gguf, load_gguf_tokenizer
        return load_gguf(Path(path)), (load_tokenizer(tokenizer) if tokenizer else load_gguf_tokenizer(Path(path)))
    run = in_progress(path)
    if run is not None:
        tok = tokenizer or (read_json(run / "run.json").get("config") or {}).get("tokenizer")
        return load_checkpoint_model(run), load_tokenizer(tokenizer_path_for(run, tok))
    folder = resolve_student_dir(path)
    return load_model(folder), load_tokenizer(tokenizer_path_for(folder, tokenizer))


def load_for_decoding(path: str | os.PathLike, tokenizer: str | None = None):
    """`load_model_and_tokenizer`, except that a GGUF file whose projections are exactly ternary (TQ2_0 / TQ1_0,
    or an f16 export of a student) has them packed in memory, so that `generate` and `serve` run it on the
    decode engine instead of as a dense fp32 model.  Returns (model, tokenizer, a line saying so or None)."""
    if not is_gguf(path):
        return (*load_model_and_tokenizer(path, tokenizer), None)
    from ..formats.gguf_load import load_gguf, load_gguf_tokenizer
    from ..formats.tokenizer import load_tokenizer as load_tokenizer_file
    from .convert import pack_if_ternary_
    from .packed_linear import PackedTernaryLinear
    model = load_gguf(Path(path), ternary=lambda codes, s16, G: PackedTernaryLinear(codes, s16, codes.shape[1] * 4,
                                                                                    G, None))   # packed as read
    tok = load_tokenizer_file(tokenizer) if tokenizer else load_gguf_tokenizer(Path(path))
    G = pack_if_ternary_(model)
    if G is None:
        return model, tok, f"{Path(path).name}: full-precision projections; decoding it as a dense model"
    return model, tok, (f"{Path(path).name}: ternary projections (groups of {G}) packed in memory as they are, "
                        "run by the packed kernels")


def load_for_scoring(path: str | os.PathLike, device) -> tuple:
    """(model, tokenizer) for `ppl` / `eval`: `load_model_and_tokenizer`, except that on a CPU a GGUF file whose
    projections are exactly ternary is packed in memory as `generate` packs it (`load_for_decoding`, said once):
    the same scores, since the packed exact products equal the dense ones (tests/test_gguf.py), in a fraction of
    the memory (1.3B TQ2_0: the dense read holds 7.3 GB)."""
    if not is_gguf(path) or torch.device(device).type != "cpu":
        return load_model_and_tokenizer(path)
    from ..log import say
    model, tok, note = load_for_decoding(path)
    say(note)
    return model, tok


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of any path `load_model` takes: a tokenizer.json, a folder holding one, or a .gguf file."""
    if is_gguf(path):
        from ..formats.gguf_load import load_gguf_tokenizer
        return load_gguf_tokenizer(Path(path))
    from ..formats.tokenizer import load_tokenizer as load_json_tokenizer
    return load_json_tokenizer(path)
