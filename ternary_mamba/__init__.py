"""ternary-mamba: grouped ternary (W1.58A16) QAT with distillation for Mamba-2, packed export, CPU inference.

Python API (mirrors the CLI):
    load_model(path_or_hub_id) -> Mamba2LM      any supported checkpoint folder, run folder, packed folder
    load_tokenizer(path)       -> Tokenizer     a tokenizer.json (or a folder holding one)
    quantize_(model, TernaryConfig(...))        swap linears for ternary QAT modules
"""
__version__ = "0.1.0"

__all__ = ["Mamba2Config", "Mamba2LM", "load_model", "load_tokenizer", "quantize_", "TernaryConfig", "UserError"]


def __getattr__(name):  # lazy: `import ternary_mamba` must not pay for torch
    if name == "Mamba2Config":
        from .config import Mamba2Config
        return Mamba2Config
    if name == "Mamba2LM":
        from .model import Mamba2LM
        return Mamba2LM
    if name == "load_model":
        from .checkpoint import load_model
        return load_model
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    if name in ("quantize_", "TernaryConfig"):
        from .quant import qat
        return getattr(qat, name)
    if name == "UserError":
        from .errors import UserError
        return UserError
    raise AttributeError(name)
