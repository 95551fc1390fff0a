"""Packed export: exact agreement with the fake-quant student, the compiled kernel against the
reference, sizes, and tampered files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, random_tq2, tiny_config
from ternary_mamba.runtime.load import load_model
from ternary_mamba.errors import UserError
from ternary_mamba.formats.packed import export_packed
from ternary_mamba.runtime.packed_linear import PackedTernaryLinear
from ternary_mamba.ops.dispatch import reference_path
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules


def _student(seed, mode="learned", group=32, **kw):
    m = random_model(tiny_config(**kw), seed=seed)
    quantize_(m, TernaryConfig(group_size=group, scale_mode=mode))
    if mode != "absmean":
        with torch.no_grad():
            for _, t in ternary_modules(m):
                t.log_scale.add_(torch.empty_like(t.log_scale).uniform_(-0.7, 0.7, generator=torch.Generator().manual_seed(seed)))
    return m.eval()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("packing", ["tq2", "tq1"])
def test_packed_logits_equal_fake_quant_exactly(seed, packing, tmp_path):
    student = _student(seed, mode=["absmean", "learned", "guarded", "learned"][seed], ngroups=1 + seed % 2)
    export_packed(student, tmp_path / "p", packing=packing, other_dtype="fp32")
    packed = load_model(tmp_path / "p")
    ids = torch.randint(0, 512, (2, 5 + 7 * seed), generator=torch.Generator().manual_seed(seed))
    with reference_path(), torch.no_grad():
        assert torch.equal(packed(ids), student(ids))


def test_fp16_export_equals_student_with_fp16_rounded_params(tmp_path):
    student = _student(7)
    export_packed(student, tmp_path / "p", packing="tq1", other_dtype="fp16")
    with torch.no_grad():
        for n, p in student.named_parameters():
            if not n.endswith((".weight", ".scale", ".log_scale")) or "norm" in n or "conv1d" in n or "embedding" in n:
                p.copy_(p.half().float())
    packed = load_model(tmp_path / "p")
    ids = torch.randint(0, 512, (1, 19))
    with reference_path(), torch.no_grad():
        assert torch.equal(packed(ids), student(ids))


def test_kernel_paths_agree_with_reference(tmp_path):
    from ternary_mamba.ops.build import get_kernel
    if get_kernel() is None:
        pytest.skip("no C compiler")
    student = _student(3, group=64)
    export_packed(student, tmp_path / "p")
    packed = load_model(tmp_path / "p")
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        fast_prefill, state = packed(ids, return_state=True)
        fast_step, _ = packed.step(ids[:, -1], state)
        with reference_path():
            ref_prefill, state = packed(ids, return_state=True)
            ref_step, _ = packed.step(ids[:, -1], state)
    assert (fast_prefill - ref_prefill).abs().max() < 1e-4   # C scan + norms vs the PyTorch reference
    assert (fast_step - ref_step).abs().max() < 1e-4         # GEMV kernel: different summation order
    lin = packed.backbone.layers[0].mixer.in_proj
    x = torch.randn(40, lin.in_features)
    with torch.no_grad():
        fast = lin(x)
        with reference_path():
            ref = lin(x)
    assert torch.equal(fast, ref)   # the dequantize kernel is exact and the GEMM the same


def test_packed_size_and_no_weight_copy(tmp_path):
    student = _student(0)
    export_packed(student, tmp_path / "p2", packing="tq2")
    export_packed(student, tmp_path / "p1", packing="tq1")
    s2 = load_file(str(tmp_path / "p2" / "model.safetensors"))
    s1 = load_file(str(tmp_path / "p1" / "model.safetensors"))
    name = "backbone.layers.0.mixer.in_proj"
    n = student.get_submodule(name).weight.numel()
    assert s2[f"{name}.codes"].numel() == -(-n // 4) and s1[f"{name}.codes"].numel() == -(-n // 5)
    assert f"{name}.weight" not in s2 and "lm_head.weight" not in s2


def _tamper(folder, fn):
    h = json.loads((folder / "config.json").read_text())
    fn(h)
    (folder / "config.json").write_text(json.dumps(h))


def test_tampered_files_fail_clearly(tmp_path):
    student = _student(1)
    export_packed(student, tmp_path / "p", packing="tq1")
    p = tmp_path / "p"
    good = (p / "config.json").read_text()
    for fn, msg in [(lambda h: h.update(format_version=99), "version"),
                    (lambda h: h.update(packing="tq3"), "unknown packing"),
                    (lambda h: h["ternary"]["backbone.layers.0.mixer.in_proj"].update(shape=[8, 8]), "does not match")]:
        _tamper(p, fn)
        with pytest.raises(UserError, match=msg):
            load_model(p)
        (p / "config.json").write_text(good)
    sd = load_file(str(p / "model.safetensors"))
    sd["backbone.layers.0.mixer.out_proj.codes"] = sd["backbone.layers.0.mixer.out_proj.codes"][:-3].clone()
    save_file(sd, str(p / "model.safetensors"))
    with pytest.raises(UserError, match="bytes"):
        load_model(p)
    raw = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="safetensors"):
        load_model(p)


def test_fused_inplace_step_matches_reference():
    from conftest import random_model, tiny_config
    m = random_model(tiny_config(ngroups=2))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids)
        _, st = m(ids[:, :5], return_state=True)
        for t in range(5, 20):
            out, st = m.step(ids[:, t], st, inplace=True)
            assert (out - full[:, t]).abs().max() < 1e-4


def test_int8_head_is_close_to_fp32():
    from conftest import random_model, tiny_config
    from ternary_mamba.runtime.heads import use_int8_head
    m = random_model(tiny_config())
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        ref = m(ids)
        use_int8_head(m)
        got = m(ids)
        _, st = m(ids[:, :4], return_state=True)
        step, _ = m.step(ids[:, 4], st)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.02 and (step - got[:, 4]).abs().max() < 1e-3


# d_conv 4: the unrolled conv (Mamba-2's width); 3 and 5: the general loop
@pytest.mark.parametrize("conv_bias,ngroups,d_conv", [(True, 1, 4), (False, 2, 4), (True, 1, 3), (False, 1, 5)])
def test_fused_mixer_step_matches_the_torch_step(conv_bias, ngroups, d_conv):
    from conftest import random_model, tiny_config
    m = random_model(tiny_config(ngroups=ngroups, conv_bias=conv_bias, d_conv=d_conv))
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_st, st = m.empty_state(3), m.empty_state(3)
        for t in range(12):
            ref, ref_st = m.step(ids[:, t], ref_st, inplace=False)
            out, st = m.step(ids[:, t], st, inplace=True)
            assert (out - ref).abs().max() < 1e-4
        for a, b in zip(ref_st, st):
            assert torch.allclose(a.conv, b.conv, atol=1e-5) and torch.allclose(a.ssm, b.ssm, atol=1e-5)


def test_a8_gemv_matches_its_integer_reference_and_is_close_to_fp32():
    from ternary_mamba.ops.build import get_kernel
    from ternary_mamba.ops.kernels import tq2_gemv, tq2_gemv_a8
    from ternary_mamba.ops.ternary_linear import ternary_linear_a8_ref as a8_reference
    if get_kernel() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, G in [(40, 256, 128), (24, 512, 256)]:
        codes, sc = random_tq2(out_f, in_f, G, g)
        x = torch.randn(3, in_f, generator=g)
        x[1] = 0  # an all-zero row must give zeros, not NaN
        ya = tq2_gemv_a8(codes, sc, x, G)
        assert torch.allclose(ya, a8_reference(codes, sc, x, G), atol=1e-4, rtol=1e-5)
        yf = tq2_gemv(codes, sc, x, G)
        assert torch.equal(ya[1], torch.zeros(out_f))
        assert (ya - yf).norm() / yf.norm() < 0.03


def test_a8_is_opt_in_and_close(tmp_path):
    from conftest import random_model, tiny_config
    from ternary_mamba.formats.packed import export_packed
    from ternary_mamba.runtime.packed_linear import use_a8_activations
    m = random_model(tiny_config(d_model=128, headdim=32))
    quantize_(m, TernaryConfig(group_size=128))
    export_packed(m, tmp_path / "p", "tq2", "fp32")
    p = load_model(tmp_path / "p")
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        st, st8 = p.empty_state(1), p.empty_state(1)
        exact, _ = p.step(ids[:, 0], st)
        ref = m.step(ids[:, 0], m.empty_state(1))[0]
        assert (exact - ref).abs().max() < 1e-5          # default: the fp32 kernel (summation order only)
        assert use_a8_activations(p) > 0
        fast, _ = p.step(ids[:, 0], st8)
        assert not torch.equal(fast, exact) and (fast - exact).norm() / exact.norm() < 0.05


def test_prefill_scratch_buffer_is_only_used_without_autograd():
    from ternary_mamba.ops.packing import pack
    g = torch.Generator().manual_seed(0)
    mods = []
    for _ in range(2):
        t = torch.randint(-1, 2, (64, 64), generator=g, dtype=torch.int8)
        mods.append(PackedTernaryLinear(pack(t, "tq2").view(64, 16), (torch.rand(64, 2, generator=g) + .1).half(),
                                        64, 32, None))
    x = torch.randn(40, 64, generator=g, requires_grad=True)      # 40 rows: the dequantize + GEMM path
    mods[1](mods[0](x)).sum().backward()
    w0, w1 = (m.dequantized_weight().clone() for m in mods)
    expect = (torch.ones(40, 64) @ w1) @ w0
    assert torch.allclose(x.grad, expect, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(mods[1](mods[0](x)), (x @ w0.T) @ w1.T, atol=1e-4)


@pytest.mark.parametrize("out_f,in_f,G,nb", [(7, 256, 64, 1), (13, 512, 128, 3), (9, 512, 256, 2), (6, 96, 32, 1), (5, 64, 16, 2),
                                             (4, 128, 128, 5)])
def test_tq2_gemv_rows_agree_with_dequant_and_with_each_other(out_f, in_f, G, nb):
    """The GEMV (rows four at a time, a tail one at a time, or the single-row loop for G % 32 != 0) against the
    dequantized weight; and every row gets the same bits whichever way it was computed (any subset of rows)."""
    from ternary_mamba.ops.kernels import get_kernel, tq2_dequant, tq2_gemv
    if get_kernel() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(out_f)
    codes, sc = random_tq2(out_f, in_f, G, g)
    x = torch.randn(nb, in_f, generator=g)
    y = tq2_gemv(codes, sc, x, G)
    ref = x.double() @ tq2_dequant(codes, sc, G).double().T
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    for lo in (1, 2, 3):      # shifted row subsets: rows move between the four-row blocks and the tail
        assert torch.equal(tq2_gemv(codes[lo:].contiguous(), sc[lo:].contiguous(), x, G), y[:, lo:])
