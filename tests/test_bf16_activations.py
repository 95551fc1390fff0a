"""The paper's A16 (bf16 activations, opt-in): the kernel against its PyTorch reference, decode and prefill of a
packed model close to the exact path, the decode engine equal to the module path, and the opt-in semantics."""
import pytest
import torch

from conftest import random_model, random_tq2, tiny_config
from ternary_mamba.runtime.load import load_model
from ternary_mamba.formats.packed import export_packed
from ternary_mamba.ops.dispatch import cpu_has_bf16_kernels
from ternary_mamba.quant.qat import TernaryConfig, quantize_
from ternary_mamba.runtime.packed_linear import use_a8_activations, use_bf16_activations


def _kernel():
    from ternary_mamba.ops.build import get_kernel
    if get_kernel() is None:
        pytest.skip("no C compiler")


@pytest.mark.parametrize("out_f,in_f,G,nb", [(13, 256, 64, 1), (8, 512, 128, 3), (5, 512, 256, 2)])
def test_bf16_gemv_matches_reference(out_f, in_f, G, nb):
    """Runs on every CPU (a portable loop without AVX512-BF16): products t * bf16(x) are exact, so only the
    order of the fp32 sums differs from the reference."""
    _kernel()
    from ternary_mamba.ops.kernels import tq2_dequant, tq2_dequant_bf16, tq2_gemv_bf16
    g = torch.Generator().manual_seed(out_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    x = torch.randn(nb, in_f, generator=g)
    ref = x.bfloat16().double() @ tq2_dequant(codes, sc, G).double().T
    y = tq2_gemv_bf16(codes, sc, x, G)
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(tq2_dequant_bf16(codes, sc, G), tq2_dequant(codes, sc, G).bfloat16())
    exact = x.double() @ tq2_dequant(codes, sc, G).double().T
    assert not torch.equal(y.double(), exact) and (y - exact).norm() / exact.norm() < 0.01


def test_packed_model_bf16_decode_and_prefill(tmp_path):
    _kernel()
    m = random_model(tiny_config(d_model=128, headdim=32))
    quantize_(m, TernaryConfig(group_size=128))
    export_packed(m, tmp_path / "p", "tq2", "fp32")
    p = load_model(tmp_path / "p")
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        exact = p(ids)
        n = use_bf16_activations(p)
        if not cpu_has_bf16_kernels():
            assert n == 0 and torch.equal(p(ids), exact)     # falls back to the exact path
            return
        assert n == 4
        fast = p(ids)                                        # prefill: bf16 GEMM
        assert not torch.equal(fast, exact) and (fast - exact).norm() / exact.norm() < 0.03
        st, ref_st = p.empty_state(1), p.empty_state(1)
        for t in range(6):
            out, st = p.step(ids[:, t], st, inplace=True)     # the C engine, bf16 GEMV
            ref, ref_st = p.step(ids[:, t], ref_st, inplace=False)   # module by module, same kernels
            assert (out - ref).abs().max() < 1e-4
            assert (out - exact[:, t]).norm() / exact[:, t].norm() < 0.03
        assert use_a8_activations(p) == 4 and not any(getattr(mm, "bf16", False) for mm in p.modules())


@pytest.mark.parametrize("out_f,in_f,G,nt", [(37, 256, 128, 5), (300, 768, 128, 51), (64, 512, 256, 17),
                                             (20, 96, 32, 3)])
def test_a8_prefill_gemm_matches_the_a8_gemv(out_f, in_f, G, nt):
    """The int8 GEMM of prefill (VNNI, or vpmaddubsw on AVX2 builds: scripts/test_kernels.sh): the a8 GEMV's arithmetic token by token (same int8 rounding,
    integer group sums), for partial row blocks and token tiles; None where the CPU has neither."""
    _kernel()
    from ternary_mamba.ops.kernels import tq2_gemm_a8, tq2_gemv_a8
    from ternary_mamba.ops.ternary_linear import ternary_linear_a8_ref as a8_reference
    g = torch.Generator().manual_seed(out_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    x = torch.randn(nt, in_f, generator=g) * 3
    x[1 % nt] = 0                                               # an all-zero token gives zeros
    y = tq2_gemm_a8(codes, sc, x, G)
    if y is None:
        pytest.skip("no AVX512-VNNI or AVX2: prefill with int8 activations dequantizes instead")
    ref = a8_reference(codes, sc, x, G)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
    if G % 128 == 0:
        rows = torch.cat([tq2_gemv_a8(codes, sc, x[i:i + 1].contiguous(), G) for i in range(nt)])
        assert (y - rows).abs().max() <= 1e-5 * rows.abs().max() + 1e-6
    assert torch.equal(y[1 % nt], torch.zeros(out_f))


def test_generate_a16_and_a8_flags(tiny_teacher_dir, tmp_path, capsys):
    """generate --a16 decodes (or says why it cannot here); --a8 with --a16 is a one-line error."""
    from ternary_mamba.cli import main
    out = tmp_path / "p"
    assert main(["export", str(tiny_teacher_dir), "--format", "tq2", "--group-size", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Once", "--max-new-tokens", "5", "--a16", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert ("AVX512-BF16" in err) != cpu_has_bf16_kernels()      # the note appears exactly where it cannot run
    assert main(["generate", str(out), "--prompt", "Once", "--a8", "--a16"]) == 1
    assert "choose one activation precision" in capsys.readouterr().err
