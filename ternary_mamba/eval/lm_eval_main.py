"""`python -m ternary_mamba.eval.lm_eval_main run --model ternary-mamba ...` (also `ternary-mamba lm-eval ...`):
lm-eval's own command line with the `ternary-mamba` model type registered first.  lm-eval releases with
plugin entry points find the model through pyproject's `lm_eval.models` entry point without this wrapper."""
import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  (runs @register_model("ternary-mamba"))
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
