"""The decode engine's re-laid ternary kernels against their references (ops/decode_layouts.py):
  r32  int8 activations, rows interleaved (csrc/decode_r32.c): the integer reference `ternary_linear_a8_ref` and the
       plane-layout kernel it replaces (the same quantized activations and integer sums);
  lut  exact products by triple-sum tables (csrc/decode_lut.c): the fake-quant product in fp64 (the bound is fp32
       rounding alone) and the FMA kernel it replaces.
Only the fp32 summation order differs from the kernels they replace."""
import pytest
import torch

from conftest import random_model, random_tq2, tiny_config
from ternary_mamba.ops import decode_layouts
from ternary_mamba.ops.kernels import tq2_gemv, tq2_gemv_a8
from ternary_mamba.ops.ternary_linear import ternary_linear_a8_ref, ternary_linear_ref
from ternary_mamba.runtime import decode_engine

CASES = {   # (out, in, G, nb): odd row counts (padded blocks), several groups per row, one group per row, batches
    "r32": [(37, 512, 128, 4), (8, 768, 256, 1), (5, 256, 128, 3), (4, 128, 128, 2), (130, 2048, 2048, 1),
            (33, 96, 16, 2), (64, 192, 64, 1)],
    "lut": [(37, 512, 128, 4), (16, 768, 256, 1), (5, 256, 64, 3), (3, 64, 16, 2), (130, 2048, 2048, 1),
            (70, 96, 48, 2), (65, 160, 32, 1)],     # G 48 and 32: a group's last slot with 4 and 5 triples
}


def needs(layout: str):
    return pytest.mark.skipif(not decode_layouts.available(layout), reason=f"no {layout} kernel in this build")


def fp16_scales(sc: torch.Tensor) -> torch.Tensor:
    return sc.half().float()          # packed files store fp16 scales: both layouts keep them exactly


@pytest.mark.parametrize("layout,case", [pytest.param(lay, c, marks=needs(lay)) for lay in CASES for c in CASES[lay]])
def test_product_matches_its_references(layout, case):
    out_f, in_f, G, nb = case
    g = torch.Generator().manual_seed(out_f + in_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    sc = fp16_scales(sc)
    x = torch.randn(nb, in_f, generator=g)
    if nb > 2:
        x[2] = 0                                       # absmax 0 / all-zero input: zeros out, no NaN
    packed = decode_layouts.pack(layout, codes, sc, G)
    rows = decode_layouts.ROWS_PER_BLOCK[layout]
    assert packed is not None and packed[0].size(0) == (out_f + rows - 1) // rows
    got = decode_layouts.gemv(layout, packed, out_f, x, G)
    if layout == "r32":
        ref = ternary_linear_a8_ref(codes, sc, x, G)
        assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
        replaced = tq2_gemv_a8(codes, sc, x, G) if G % 128 == 0 else ref    # smaller groups: r32 only
    else:
        ref = ternary_linear_ref(x.double(), codes, sc.double(), G)
        bound = 4e-7 * in_f ** 0.5 * (x.abs().sum(-1, keepdim=True) * sc.max())    # fp32 rounding of the sums
        assert ((got.double() - ref).abs() <= bound).all()
        replaced = tq2_gemv(codes, sc, x, G)
    assert (got - replaced).abs().max() <= 1e-5 * (1 + ref.abs().max())
    if nb > 2:
        assert (got[2] == 0).all()


@pytest.mark.parametrize("layout,bad_G", [pytest.param("r32", 8, marks=needs("r32")),
                                          pytest.param("lut", 8, marks=needs("lut"))])
def test_pack_declines_what_it_cannot_hold_exactly(layout, bad_G):
    g = torch.Generator().manual_seed(0)
    codes, sc = random_tq2(8, 256, 128, g)
    assert decode_layouts.pack(layout, codes, sc + 1e-4, 128) is None         # not fp16 values: would change y
    assert decode_layouts.pack(layout, codes, fp16_scales(sc), 128) is not None
    codes_b, sc_b = random_tq2(8, 256, bad_G, g)
    assert decode_layouts.pack(layout, codes_b, fp16_scales(sc_b), bad_G) is None   # a group size it was not written for


@pytest.mark.skipif(not decode_layouts.available("lut"), reason="no lut kernel in this build")
def test_lut_codes_take_no_more_bytes_than_tq2():
    for in_f, G in [(2048, 128), (4096, 128), (768, 256), (96, 48), (64, 16), (2048, 2048)]:
        tq2 = in_f // 4 * 64                                       # a block of 64 rows in tq2
        assert decode_layouts.block_bytes("lut", in_f, G) <= tq2
    assert decode_layouts.block_bytes("lut", 2048, 128) == 2048 // 4 * 64


@pytest.mark.parametrize("layout", [pytest.param("r32", marks=needs("r32")), pytest.param("lut", marks=needs("lut"))])
@torch.no_grad()
def test_engine_decodes_through_the_layout_as_through_the_kernel_it_replaces(layout, monkeypatch):
    from ternary_mamba.bench.runtime import pack_in_place
    from ternary_mamba.runtime.packed_linear import use_a8_activations
    m = random_model(tiny_config(d_model=128, headdim=32))
    pack_in_place(m, 128)
    if layout == "r32":
        assert use_a8_activations(m) > 0
    flag = {"r32": "USE_R32", "lut": "USE_LUT"}[layout]
    toks = torch.tensor([[3, 5, 100, 7, 0, 509], [1, 2, 3, 4, 5, 6]])

    def run(on: bool):
        monkeypatch.setattr(decode_engine, flag, on)
        decode_engine._ENGINES.clear()
        st, outs = m.empty_state(2), []
        for t in range(toks.size(1)):
            o, st = decode_engine.step(m, toks[:, t], st)
            outs.append(o)
        return torch.stack(outs, 1), decode_engine.engine_for(m).kernel_kinds()

    a, kinds_a = run(False)
    b, kinds_b = run(True)
    assert f"tq2_{layout}" not in kinds_a and kinds_b.count(f"tq2_{layout}") == 2 * m.config.n_layer
    assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max())
