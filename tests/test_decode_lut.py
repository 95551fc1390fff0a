"""The exact decode GEMV by subset-sum tables (csrc/decode_lut.c) against its references: the fake-quant product
`ternary_linear_ref` (fp64 here, so the bound is fp32 rounding alone) and the FMA kernel it replaces in the engine."""
import pytest
import torch

from conftest import random_model, random_tq2, tiny_config
from ternary_mamba.ops.decode_layouts import tq2lut_available, tq2lut_gemv, tq2lut_pack
from ternary_mamba.ops.kernels import tq2_gemv
from ternary_mamba.ops.ternary_linear import ternary_linear_ref
from ternary_mamba.runtime import decode_engine

pytestmark = pytest.mark.skipif(not tq2lut_available(), reason="no AVX-512 lut kernel in this build")


def fp16_scales(sc: torch.Tensor) -> torch.Tensor:
    return sc.half().float()          # packed files store fp16 scales: the lut layout keeps them exactly


@pytest.mark.parametrize("out_f,in_f,G,nb", [(37, 512, 128, 4), (16, 768, 256, 1), (5, 256, 64, 3), (3, 64, 8, 2),
                                             (130, 2048, 2048, 1)])
def test_lut_gemv_is_the_exact_product_within_fp32_rounding(out_f, in_f, G, nb):
    g = torch.Generator().manual_seed(out_f + in_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    sc = fp16_scales(sc)
    x = torch.randn(nb, in_f, generator=g)
    if nb > 2:
        x[2] = 0
    packed = tq2lut_pack(codes, sc, G)
    assert packed is not None and packed[0].size(0) == (out_f + 15) // 16
    got = tq2lut_gemv(packed, out_f, x, G)
    ref = ternary_linear_ref(x.double(), codes, sc.double(), G)
    bound = 4e-7 * in_f ** 0.5 * (x.abs().sum(-1, keepdim=True) * sc.max())     # fp32 rounding of the sums
    assert ((got.double() - ref).abs() <= bound).all()
    assert (got - tq2_gemv(codes, sc, x, G)).abs().max() <= 1e-5 * (1 + ref.abs().max())
    if nb > 2:
        assert (got[2] == 0).all()


def test_lut_pack_declines_what_it_cannot_hold_exactly():
    g = torch.Generator().manual_seed(0)
    codes, sc = random_tq2(8, 256, 128, g)
    assert tq2lut_pack(codes, sc + 1e-4, 128) is None                # not fp16 values: would change the product
    assert tq2lut_pack(codes, fp16_scales(sc), 128) is not None
    codes4, sc4 = random_tq2(8, 256, 4, g)
    assert tq2lut_pack(codes4, fp16_scales(sc4), 4) is None            # groups of 4: not a multiple of 8


@torch.no_grad()
def test_engine_decodes_exactly_through_lut_as_through_the_fma_kernel(monkeypatch):
    from ternary_mamba.bench.runtime import pack_in_place
    m = random_model(tiny_config(d_model=128, headdim=32))
    pack_in_place(m, 128)
    toks = torch.tensor([[3, 5, 100, 7, 0, 509], [1, 2, 3, 4, 5, 6]])

    def run(use_lut: bool):
        monkeypatch.setattr(decode_engine, "USE_LUT", use_lut)
        decode_engine._ENGINES.clear()
        st, outs = m.empty_state(2), []
        for t in range(toks.size(1)):
            o, st = decode_engine.step(m, toks[:, t], st)
            outs.append(o)
        return torch.stack(outs, 1), decode_engine.engine_for(m).kernel_kinds()

    a, kinds_a = run(False)
    b, kinds_b = run(True)
    assert "tq2_lut" not in kinds_a and kinds_b.count("tq2_lut") == 2 * m.config.n_layer
    assert (a - b).abs().max() <= 1e-5 * (1 + a.abs().max())
