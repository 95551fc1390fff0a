"""The numeric spec (ternary_mamba/spec.py) is the one place its facts live: no other module re-declares one of
its names or writes one of its values as a literal where the spec's name belongs."""
import ast
from pathlib import Path

import pytest

from ternary_mamba import spec
from ternary_mamba.errors import UserError

PKG = Path(__file__).resolve().parents[1] / "ternary_mamba"
SPEC_TUPLES = {k: v for k, v in vars(spec).items() if k.isupper() and isinstance(v, tuple)
               and all(isinstance(x, str) for x in v)}
# divisors that are spec facts (a group rule, a layout): `x % 256` outside the spec is a copied rule
SPEC_DIVISORS = {spec.GGUF_TQ_BLOCK, spec.A8_GROUP_MULTIPLE, spec.BF16_GROUP_MULTIPLE, spec.Q4_GROUP,
                 spec.SCAN_KERNEL_MULTIPLE}
SPEC_FLOATS = {spec.FP16_MAX, spec.BF16_MAX}


def _package_files():
    return [p for p in PKG.rglob("*.py") if p.name != "spec.py"]


def test_no_module_redeclares_a_spec_name():
    names = {k for k in vars(spec) if k.isupper()}
    bad = []
    for p in _package_files():
        for node in ast.parse(p.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id in names:
                        bad.append(f"{p.relative_to(PKG)}:{node.lineno} assigns {n.id}")
    assert not bad, "\n".join(bad)


def test_no_spec_literal_outside_the_spec():
    bad = []
    for p in _package_files():
        for node in ast.walk(ast.parse(p.read_text())):
            where = f"{p.relative_to(PKG)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                values = {e.value for e in node.elts}
                for name, t in SPEC_TUPLES.items():
                    if values == set(t) or (len(values) >= 3 and values < set(t)):
                        bad.append(f"{where} spells out spec.{name} {sorted(values)}")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.right, ast.Constant) \
                    and node.right.value in SPEC_DIVISORS:
                bad.append(f"{where} tests `% {node.right.value}` (a spec rule: ask spec.group_paths or name it)")
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value in SPEC_FLOATS:
                bad.append(f"{where} writes the spec's {node.value}")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_copied_rule(tmp_path):
    tree = ast.parse("ok = G % 256 == 0\nMODES = ('absmean', 'learned', 'frozen', 'guarded')\n")
    mods = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod)]
    assert mods and mods[0].right.value in SPEC_DIVISORS
    tup = next(n for n in ast.walk(tree) if isinstance(n, ast.Tuple))
    assert {e.value for e in tup.elts} == set(SPEC_TUPLES["SCALE_MODES"])


@pytest.mark.parametrize("G, in_f, want", [(128, 256, 128), (-1, 768, 768), (64, 64, 64)])
def test_resolve_group_size(G, in_f, want):
    assert spec.resolve_group_size(G, in_f) == want


@pytest.mark.parametrize("G", [0, -2, True, 1.5, "128"])
def test_check_group_size_rejects(G):
    with pytest.raises(UserError):
        spec.check_group_size(G)


def test_group_size_must_divide_the_row():
    with pytest.raises(UserError, match="does not divide"):
        spec.resolve_group_size(96, 128)


@pytest.mark.parametrize("G", [8, 12, 64, 96, 128, 256, 384, 512, 768])
def test_group_paths_follow_divisibility_by_the_kernels_block_sizes(G):
    p = spec.group_paths(G)
    # independent statement of each kernel's layout: whole 8-weight bytes pairs for the GEMV, whole
    # 128-weight integer sums for a8, whole 64-weight bf16 chunks, whole 256-weight llama.cpp blocks
    assert p.gemv == (G / 8).is_integer()
    assert p.gemv_a8 == (G / 128).is_integer()
    assert p.gemv_bf16 == (G / 64).is_integer()
    assert p.gguf_tq == (G / 256).is_integer()
    with pytest.raises(ValueError):
        spec.group_paths(-1)


def test_bits_per_weight():
    assert spec.bits_per_weight(128, "tq2") == pytest.approx(2 + 16 / 128)
    assert spec.bits_per_weight(768, "tq1") == pytest.approx(1.6 + 16 / 768)
    with pytest.raises(ValueError):
        spec.bits_per_weight(-1)


def test_kernel_kinds_match_the_c_library():
    from ternary_mamba.ops.build import get_kernel
    from ternary_mamba.ops.abi import check_abi
    if get_kernel() is None:
        pytest.skip("no kernel library on this machine (the kernel build test fails for that)")
    check_abi(get_kernel())
