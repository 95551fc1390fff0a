"""The row-interleaved int8-activation decode GEMV (csrc/decode_r4.c) against its references: the integer
reference `ternary_linear_a8_ref` and the plane-layout kernel it replaces in the engine (same quantized
activations and integer sums; only the fp32 summation order differs)."""
import pytest
import torch

from conftest import random_model, random_tq2, tiny_config
from ternary_mamba.ops.decode_layouts import tq2r4_available, tq2r4_gemv, tq2r4_pack
from ternary_mamba.ops.kernels import tq2_gemv_a8
from ternary_mamba.ops.ternary_linear import ternary_linear_a8_ref
from ternary_mamba.runtime import decode_engine

pytestmark = pytest.mark.skipif(not tq2r4_available(), reason="no AVX512-VNNI r4 kernel in this build")


def fp16_scales(sc: torch.Tensor) -> torch.Tensor:
    return sc.half().float()          # packed files store fp16 scales: the r4 layout keeps them exactly


@pytest.mark.parametrize("out_f,in_f,G,nb", [(37, 512, 128, 4), (8, 768, 256, 1), (5, 256, 128, 3), (4, 128, 128, 2),
                                             (130, 2048, 2048, 1)])
def test_r4_gemv_matches_the_integer_reference_and_the_plane_kernel(out_f, in_f, G, nb):
    g = torch.Generator().manual_seed(out_f + in_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    sc = fp16_scales(sc)
    x = torch.randn(nb, in_f, generator=g)
    if nb > 2:
        x[2] = 0                                       # absmax 0: all-zero output, no NaN
    packed = tq2r4_pack(codes, sc, G)
    assert packed is not None and packed[0].size(0) == (out_f + 3) // 4 * 4
    got = tq2r4_gemv(packed, out_f, x, G)
    ref = ternary_linear_a8_ref(codes, sc, x, G)
    assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    assert (got - tq2_gemv_a8(codes, sc, x, G)).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_r4_pack_declines_what_it_cannot_hold_exactly():
    g = torch.Generator().manual_seed(0)
    codes, sc = random_tq2(8, 256, 128, g)
    assert tq2r4_pack(codes, sc + 1e-4, 128) is None                 # not fp16 values: would change the product
    assert tq2r4_pack(codes, fp16_scales(sc), 128) is not None
    codes64, sc64 = random_tq2(8, 256, 64, g)
    assert tq2r4_pack(codes64, fp16_scales(sc64), 64) is None          # groups of 64: not a multiple of 128


@torch.no_grad()
def test_engine_decodes_int8_activations_through_r4_as_through_the_plane_kernel(monkeypatch):
    from ternary_mamba.bench.runtime import pack_in_place
    from ternary_mamba.runtime.packed_linear import use_a8_activations
    m = random_model(tiny_config(d_model=128, headdim=32))
    pack_in_place(m, 128)
    assert use_a8_activations(m) > 0
    toks = torch.tensor([[3, 5, 100, 7, 0, 509], [1, 2, 3, 4, 5, 6]])

    def run(use_r4: bool):
        monkeypatch.setattr(decode_engine, "USE_R4", use_r4)
        decode_engine._ENGINES.clear()
        st, outs = m.empty_state(2), []
        for t in range(toks.size(1)):
            o, st = decode_engine.step(m, toks[:, t], st)
            outs.append(o)
        eng = decode_engine.engine_for(m)
        return torch.stack(outs, 1), eng.kernel_kinds()

    a, kinds_a = run(False)
    b, kinds_b = run(True)
    assert "tq2_r4" not in kinds_a and kinds_b.count("tq2_r4") == 2 * m.config.n_layer
    assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max())
