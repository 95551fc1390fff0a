"""`ternary-mamba lm-eval ...` (also `python -m ternary_mamba.eval.lm_eval_main ...`): lm-eval's own command line
with the `ternary-mamba` model type registered first, e.g.

    ternary-mamba lm-eval run --model ternary-mamba --model_args pretrained=runs/x --tasks hellaswag
    ternary-mamba lm-eval --help

Plain `lm_eval --model ternary-mamba` works only in lm-eval releases that read the `lm_eval.models` entry point
of pyproject; this wrapper works with every release (it imports the registration before lm-eval parses).
From Python: `import ternary_mamba.eval.harness` and then `lm_eval.simple_evaluate(model="ternary-mamba", ...)`."""
import sys

from ..errors import UserError


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise UserError("lm-eval is not installed: pip install 'ternary-mamba[eval]'") from None
    from . import harness  # noqa: F401  (runs @register_model("ternary-mamba"))
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
