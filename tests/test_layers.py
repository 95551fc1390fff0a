"""The package's architecture, kept: imports flow one way through the layers below, with no cycles and no
private names imported across modules.  Every import counts, including those inside functions.

Layers, from the ground up (a module may import its own package and any lower layer, never a higher one):
  0  errors, config_base, version,   one exception type, the typed-config base, the version, bundled files,
     assets, spec                    the numeric spec (group rules, scale bounds, layouts, kernel kinds, limits)
  1  ops                             kernel build, C bindings, autograd functions, the one dispatch point
  2  core                            config + parameter counts, the model, the PyTorch SSD reference
  3  quant                           ternary math, QAT modules, packing, post-hoc corrections, monitor
  4  formats                         pure serialization: our folders, packed, GGUF, HF folders, tokenizers, configs,
                                     sizes, paths (what is read is a header + tensors; no runtime module)
  5  runtime                         packed linear, heads, decode engine, generation, convert_, memory, and
                                     load_model (builds on meta, swaps modules, loads with assign=True)
  6  train, eval                     training loop / objectives / runs / report; scoring, lm-eval, parity
  7  commands                        one function per CLI command over its typed config
  8  experiment, bench               the claims experiment; the shipped benchmarks
  9  cli, __main__, ternary_mamba    the command line and the lazy public API
Extra rules: train and eval, experiment and bench never import each other; core never imports quant (the model knows nothing of
quantization); quant and formats never import train.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ternary_mamba"
LAYER = {"errors": 0, "config_base": 0, "version": 0, "assets": 0, "spec": 0, "faults": 0, "log": 0, "ops": 1, "core": 2, "quant": 3, "formats": 4, "runtime": 5,
         "train": 6, "eval": 6, "commands": 7, "experiment": 8, "bench": 8, "cli": 9, "__main__": 9, "": 9}
FORBIDDEN = {("train", "eval"), ("eval", "train"), ("experiment", "bench"), ("bench", "experiment"),
             ("core", "quant"), ("quant", "train"), ("formats", "train")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("ternary_mamba",) + parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the package in the file."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
                target = ".".join(parts)
            else:
                target = node.module or ""
            if not target.startswith("ternary_mamba"):
                continue
            names = [a.name for a in node.names]
            for n in list(names):   # `from . import distributed` imports a module
                if f"{target}.{n}" in modules:
                    found.append((f"{target}.{n}", [], node.lineno))
                    names.remove(n)
            if names:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ternary_mamba"):
                    found.append((a.name, [], node.lineno))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_top_level_name_has_a_layer():
    modules, _ = _graph()
    assert {_top(m) for m in modules} <= set(LAYER), {_top(m) for m in modules} - set(LAYER)


def test_imports_flow_down_the_layers():
    _, graph = _graph()
    bad = []
    for src, deps in graph.items():
        a = _top(src)
        for dst, _, line in deps:
            b = _top(dst)
            if b == a:
                continue
            if LAYER[b] > LAYER[a] or (a, b) in FORBIDDEN:
                bad.append(f"{src}:{line} imports {dst} ({a} layer {LAYER[a]} -> {b} layer {LAYER[b]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules, graph = _graph()
    edges = {m: {d for d, _, _ in deps if d in modules and d != m} for m, deps in graph.items()}
    # a package's __init__ is imported by its submodules implicitly; only explicit edges count
    color, stack, cycles = {}, [], []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if color.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in color:
                visit(d)
        stack.pop()
        color[m] = 2
    for m in sorted(edges):
        if m not in color:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    _, graph = _graph()
    bad = [f"{src}:{line} imports {n} from {dst}" for src, deps in graph.items() for dst, names, line in deps
           if dst != src for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_model_knows_nothing_of_quantization_formats_or_training():
    _, graph = _graph()
    for src, deps in graph.items():
        if _top(src) == "core":
            assert all(_top(d) in ("core", "ops", "errors", "config_base", "spec") for d, _, _ in deps), (src, deps)


def test_the_spec_sits_at_the_bottom():
    _, graph = _graph()
    deps = {_top(d) for d, _, _ in graph["ternary_mamba.spec"]}
    assert deps <= {"errors"}, deps


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..train.loop import Trainer\n")
    found = _imports("ternary_mamba.core.m", f, {})
    assert found and found[0][0] == "ternary_mamba.train.loop"


def test_files_stay_small():
    big = [f"{p.relative_to(PKG)}: {n} lines" for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400]
    assert not big, big
