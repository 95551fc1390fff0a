"""The package version (one place; `ternary_mamba.__version__` and run records read it)."""
__version__ = "0.1.0"


def code_version() -> str:
    """A digest of the package's own source (Python and C, not docs): what the claims experiment keys its cached
    stages and its published results by, so a number is never reused across code that could change it."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import hashlib
        from pathlib import Path
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for p in sorted(q for q in root.rglob("*") if q.suffix in (".py", ".c", ".h") and q.is_file()):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _CODE_VERSION = h.hexdigest()[:12]
    return _CODE_VERSION


_CODE_VERSION: str | None = None
