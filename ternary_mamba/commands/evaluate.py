"""`ternary-mamba eval` and `ternary-mamba ppl` over typed configs (the scoring itself lives in `eval/`)."""
from __future__ import annotations

from .configs import EvalConfig, PplConfig
from .flags import require


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Zero-shot tasks for every model in `cfg.models`, side by side; one result dict per model.
    The Python twin of `ternary-mamba eval`."""
    from ..eval.evaluate import run_eval
    require(cfg, "models", "data_dir", command="eval")
    return run_eval(cfg)


def perplexity(cfg: PplConfig) -> dict:
    """Perplexity and bits per byte of every model on `cfg.text`: {model: {"ppl", "bits_per_byte", ...}}.
    The Python twin of `ternary-mamba ppl`."""
    from ..eval.perplexity import run_ppl
    require(cfg, "models", "text", command="ppl")
    return run_ppl(cfg)
