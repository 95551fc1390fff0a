"""ternary-mamba: grouped ternary (W1.58A16) QAT with distillation for Mamba-2, packed export, CPU inference.

Python API (mirrors the CLI: each command is a function over the same typed config its flags fill in):
    quantize(QuantizeConfig(...))    -> run folder     `ternary-mamba quantize`
    pretrain(PretrainConfig(...))    -> run folder     `ternary-mamba pretrain`
    ptq(PtqConfig(...))              -> summary dict   `ternary-mamba ptq`
    export(ExportConfig(...))        -> output path    `ternary-mamba export`
    generate(GenerateConfig(...))    -> text           `ternary-mamba generate`
    evaluate(EvalConfig(...))        -> results        `ternary-mamba eval`
    perplexity(PplConfig(...))       -> results        `ternary-mamba ppl`
    load_model(path_or_hub_id)       -> Mamba2LM       model / run / packed folder, .gguf file or hub id
    load_tokenizer(path)             -> Tokenizer      a tokenizer.json (a folder holding one, or a .gguf file)
    save_model(model, folder)        -> folder         our folder format (config.json + safetensors), atomically
    quantize_(model, TernaryConfig(...))               swap linears for ternary QAT modules, in place
    convert_(model)                                    fake-quant ternary modules -> packed ones, in place
    reference_path()                                   run the pure-PyTorch reference inside a `with` block
    quiet()                                            say nothing inside a `with` block (the "ternary_mamba" logger)
"""
from .version import __version__  # noqa: E402,F401

# name -> (module, attribute); resolved lazily so that `import ternary_mamba` does not pay for torch
_API = {
    "Mamba2Config": ("core.config", "Mamba2Config"),
    "Mamba2LM": ("core.model", "Mamba2LM"),
    "load_model": ("runtime.load", "load_model"),
    "load_tokenizer": ("runtime.load", "load_tokenizer"),
    "save_model": ("formats.folders", "save_model"),
    "quantize_": ("quant.qat", "quantize_"),
    "convert_": ("runtime.convert", "convert_"),
    "reference_path": ("ops.dispatch", "reference_path"),
    "TernaryConfig": ("quant.config", "TernaryConfig"),
    "MonitorConfig": ("quant.config", "MonitorConfig"),
    "TrainConfig": ("train.config", "TrainConfig"),
    "DistillConfig": ("train.config", "DistillConfig"),
    "QuantizeConfig": ("commands.configs", "QuantizeConfig"),
    "PretrainConfig": ("commands.configs", "PretrainConfig"),
    "PtqConfig": ("commands.configs", "PtqConfig"),
    "ExportConfig": ("commands.configs", "ExportConfig"),
    "GenerateConfig": ("commands.configs", "GenerateConfig"),
    "EvalConfig": ("commands.configs", "EvalConfig"),
    "PplConfig": ("commands.configs", "PplConfig"),
    "ClaimsConfig": ("commands.configs", "ClaimsConfig"),
    "quantize": ("commands.quantize", "quantize"),
    "pretrain": ("commands.pretrain", "pretrain"),
    "ptq": ("commands.ptq", "ptq"),
    "export": ("commands.export", "export"),
    "generate": ("commands.generate", "generate"),
    "evaluate": ("commands.evaluate", "evaluate"),
    "perplexity": ("commands.evaluate", "perplexity"),
    "claims": ("experiment.claims", "claims"),
    "UserError": ("errors", "UserError"),
    "quiet": ("log", "quiet"),
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'ternary_mamba' has no attribute {name!r}")
    import importlib
    module, attr = _API[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def __dir__():
    return sorted(set(globals()) | set(_API))
