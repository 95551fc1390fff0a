"""The package version (one place; `ternary_mamba.__version__` and run records read it)."""
__version__ = "0.1.0"
