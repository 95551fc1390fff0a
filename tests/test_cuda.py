"""The GPU path on a real CUDA device: the Triton kernels compiled for the GPU against their CPU references, the
model's forward on CUDA against the CPU, one real QAT+KD step through the Trainer, and `quantize --device cuda`
with an exact export.  Skipped where CUDA is absent (every CI machine); `scripts/gpu_smoke.sh` runs them."""
import copy
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from ternary_mamba.cli import main  # noqa: E402
from ternary_mamba.core.model import Mamba2LM  # noqa: E402
from ternary_mamba.ops import dispatch  # noqa: E402
from ternary_mamba.ops.losses import kl_div_ref  # noqa: E402
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules  # noqa: E402
from ternary_mamba.quant.ternary import TernarySTE  # noqa: E402

from conftest import fake_quant_weights, random_model, tiny_config  # noqa: E402

CUDA = torch.device("cuda")


def test_dispatch_sends_cuda_tensors_to_triton_and_never_to_c():
    x = torch.ones(4, device=CUDA)
    assert dispatch.triton_for(x) and not dispatch.kernels_for(x)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
@pytest.mark.parametrize("learned", [False, True])
def test_compiled_fake_quant_is_bit_exact_with_the_cpu_reference(fmt, learned):
    tk = dispatch.triton_kernels()
    G = 64
    w, s = fake_quant_weights(96, 512, G)
    w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    w2, s2 = w.to(CUDA).requires_grad_(), s.to(CUDA).requires_grad_()
    ref = TernarySTE.apply(w1, s1, G, learned, fmt)
    got = tk.ternary_fake_quant(w2, s2, G, learned, fmt)
    assert torch.equal(got.cpu(), ref)
    dq = torch.randn_like(ref)
    (ref * dq).sum().backward()
    (got * dq.to(CUDA)).sum().backward()
    assert torch.equal(w2.grad.cpu(), w1.grad)
    if learned:
        assert torch.allclose(s2.grad.cpu(), s1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["rms", "gated"])
def test_compiled_norms_match_the_cpu_reference_at_1_3b_width(which):
    """ops/triton_norms.py compiled for the GPU (what the dispatcher picks there) against the PyTorch references."""
    from ternary_mamba.ops import norms
    g = torch.Generator().manual_seed(2)
    d = 2048 if which == "rms" else 4096
    args = [torch.randn(2, 64, d, generator=g)] + ([torch.randn(2, 64, d, generator=g)] if which == "gated" else [])
    w = torch.rand(d, generator=g) + 0.5
    fn = (lambda *a: norms.rms_norm(*a, 1e-5)) if which == "rms" else (lambda *a: norms.gated_norm(*a, 1, 1e-5))
    ref_fn = (lambda *a: norms.rms_norm_ref(*a, 1e-5)) if which == "rms" else \
        (lambda *a: norms.gated_norm_ref(*a, 1, 1e-5))
    cpu = [t.clone().requires_grad_() for t in args + [w]]
    gpu = [t.to(CUDA).requires_grad_() for t in args + [w]]
    ref, got = ref_fn(*cpu), fn(*gpu)
    assert dispatch.last_impl("rms_norm" if which == "rms" else "gated_norm") == "triton"
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    dout = torch.randn(ref.shape, generator=g)
    (ref * dout).sum().backward()
    (got * dout.to(CUDA)).sum().backward()
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-3, atol=1e-3)


def test_compiled_conv_silu_matches_the_cpu_reference_at_1_3b_width():
    from ternary_mamba.ops import conv
    g = torch.Generator().manual_seed(3)
    C, K = 4352, 4
    ins = [torch.randn(2, 300, C, generator=g), torch.randn(C, 1, K, generator=g) * 0.5, torch.randn(C, generator=g),
           torch.randn(2, C, K - 1, generator=g)]
    cpu = [t.clone().requires_grad_() for t in ins]
    gpu = [t.to(CUDA).requires_grad_() for t in ins]
    o1, s1 = conv.conv_silu_ref(*cpu)
    o2, s2 = conv.conv_silu(*gpu)
    assert dispatch.last_impl("conv_silu") == "triton"
    torch.testing.assert_close(o2.cpu(), o1, rtol=1e-4, atol=1e-4)
    dout = torch.randn(o1.shape, generator=g)
    (o1 * dout).sum().backward()
    (o2 * dout.to(CUDA)).sum().backward()
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-3, atol=2e-3)


def test_compiled_scan_forward_matches_the_cpu_reference_at_1_3b_shapes():
    """The Triton scan forward (no gradient: the teacher, evaluation, prefill) on the GPU, at 1.3B's mixer shapes."""
    from ternary_mamba.core.config import PRESETS, Mamba2Config
    from ternary_mamba.ops import scan
    c = Mamba2Config(**PRESETS["mamba2-1.3b"])
    dims = scan.ScanDims(c.nheads, c.headdim, c.ngroups, c.d_state, c.chunk_size)
    g = torch.Generator().manual_seed(4)
    xBC = torch.randn(2, 300, c.conv_dim, generator=g)
    dt = torch.rand(2, 300, c.nheads, generator=g) * 0.1 + 0.001
    A, D = -(torch.rand(c.nheads, generator=g) * 15 + 1), torch.randn(c.nheads, generator=g)
    init = torch.randn(2, c.nheads, c.headdim, c.d_state, generator=g)
    y1, s1 = scan.ssd_scan_ref(xBC, dt, A, D, dims, init)
    with torch.no_grad():
        y2, s2 = scan.ssd_scan(*(t.to(CUDA) for t in (xBC, dt, A, D)), dims, init.to(CUDA))
    if dispatch.mamba_ssm_scan(xBC.to(CUDA)) is None:
        assert dispatch.last_impl("ssd_scan") == "triton-fwd"
    torch.testing.assert_close(y2.cpu(), y1, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s2.cpu(), s1, rtol=1e-3, atol=1e-3)


def test_compiled_training_scan_matches_the_cpu_reference_in_values_and_gradients():
    """Our Triton scan's forward + backward on the GPU (where mamba_ssm is absent) at 1.3B's mixer shapes."""
    from ternary_mamba.core.config import PRESETS, Mamba2Config
    from ternary_mamba.ops import scan
    c = Mamba2Config(**PRESETS["mamba2-1.3b"])
    dims = scan.ScanDims(c.nheads, c.headdim, c.ngroups, c.d_state, c.chunk_size)
    g = torch.Generator().manual_seed(5)
    ins = [torch.randn(1, 300, c.conv_dim, generator=g), torch.rand(1, 300, c.nheads, generator=g) * 0.1 + 0.001,
           -(torch.rand(c.nheads, generator=g) * 15 + 1), torch.randn(c.nheads, generator=g)]
    cpu = [t.clone().requires_grad_() for t in ins]
    gpu = [t.to(CUDA).requires_grad_() for t in ins]
    y1, _ = scan.ssd_scan_ref(*cpu, dims)
    y2, _ = scan.ssd_scan(*gpu, dims)
    if dispatch.mamba_ssm_scan(gpu[0]) is None:
        assert dispatch.last_impl("ssd_scan") == "triton"
    torch.testing.assert_close(y2.detach().cpu(), y1.detach(), rtol=1e-3, atol=1e-3)
    dout = torch.randn(y1.shape, generator=g)
    (y1 * dout).sum().backward()
    (y2 * dout.to(CUDA)).sum().backward()
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=2e-3, atol=2e-3 * max(1.0, float(b.grad.abs().max())))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_compiled_kl_matches_the_cpu_reference(tau):
    tk = dispatch.triton_kernels()
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 50280, generator=g) * 3          # a real vocabulary: the kernel streams it in blocks
    s = (torch.randn(64, 50280, generator=g) * 3).requires_grad_()
    s2 = s.detach().to(CUDA).requires_grad_()
    ref = kl_div_ref(t, s, tau)
    got = tk.kl_div(t.to(CUDA), s2, tau)
    assert torch.allclose(got.cpu(), ref, rtol=1e-4, atol=1e-6)
    ref.backward()
    got.backward()
    assert torch.allclose(s2.grad.cpu(), s.grad, rtol=1e-3, atol=1e-8)


def test_model_forward_on_cuda_matches_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = random_model(tiny_config(n_layer=3, vocab_size=1000), seed=2)
    ids = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        got = copy.deepcopy(model).to(CUDA)(ids.to(CUDA)).cpu()
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_one_qat_kd_step_on_cuda_keeps_everything_on_the_device(tmp_path):
    from ternary_mamba.train.config import TrainConfig
    from ternary_mamba.train.data import PackedSequences
    from ternary_mamba.train.distill import DistillObjective
    from ternary_mamba.train.loop import Trainer
    teacher = random_model(tiny_config(vocab_size=1000)).to(CUDA)
    student = copy.deepcopy(teacher)
    quantize_(student, TernaryConfig(group_size=32, scale_mode="learned"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = PackedSequences(np.arange(8 * 65, dtype=np.uint16) % 1000, 64)
    trainer = Trainer(student.train(), DistillObjective(teacher.to(torch.bfloat16), alpha_ce=0.5),
                      TrainConfig(tokens=256, seq_len=64, batch_size=2, eval_every=0), tmp_path, data, None,
                      device=CUDA, dtype=torch.bfloat16)
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert all(p.device.type == CUDA.type for p in student.parameters())
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("log_scale") for n in moved) and any(n.endswith("in_proj.weight") for n in moved)


def test_quantize_on_cuda_in_bf16_exports_exactly(tiny_teacher_dir, text_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["quantize", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--tokens", "8192",
                 "--seq-len", "64", "--batch-size", "8", "--group-size", "32", "--scale-mode", "learned",
                 "--eval-every", "0", "--final-eval-batches", "1", "--device", "cuda", "--dtype", "bf16",
                 "--out", str(out)]) == 0
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 16 and all(np.isfinite(losses))
    from ternary_mamba import load_model
    student = load_model(out)
    assert main(["export", str(out), "--out", str(tmp_path / "pk")]) == 0
    packed = load_model(tmp_path / "pk")
    for name, m in ternary_modules(student):
        wq = m.quantized_weight().detach()
        assert torch.equal(packed.get_submodule(name).dequantized_weight(), wq)
    # the packed model on the GPU (its codes unpacked there) computes what it computes on the CPU
    ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = packed(ids)
        got = copy.deepcopy(packed).to(CUDA)(ids.to(CUDA)).cpu()
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert main(["ppl", str(tmp_path / "pk"), "--text", str(text_dir), "--seq-len", "64", "--max-tokens", "2048",
                 "--device", "cuda", "--dtype", "bf16"]) == 0
    assert main(["generate", str(tmp_path / "pk"), "--prompt", "Once", "--max-new-tokens", "8", "--temperature",
                 "0", "--device", "cuda"]) == 0


def test_a_1_3b_student_fits_and_steps_in_bf16():
    """The real 1.3B config (random weights: no hub here) forward + backward under bf16 autocast."""
    from ternary_mamba.core.config import PRESETS, Mamba2Config
    cfg = Mamba2Config(**PRESETS["mamba2-1.3b"])
    with CUDA:
        student = Mamba2LM(cfg)
    quantize_(student, TernaryConfig(group_size=128, scale_mode="learned"))
    ids = torch.randint(0, cfg.vocab_size, (1, 512), device=CUDA)
    with torch.autocast("cuda", torch.bfloat16):
        loss = student(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert student.backbone.layers[0].mixer.in_proj.log_scale.grad.abs().sum() > 0
    del student
    torch.cuda.empty_cache()
