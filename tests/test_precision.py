"""Device and precision: bf16 / fp16 autocast runs, their exact export, a full QAT+KD step of the real 1.3B
config on the `meta` device (no tensor on the wrong device, no C kernel off the CPU), and C kernels refusing
tensors they were not written for."""
import copy
import json

import numpy as np
import pytest
import torch

from ternary_mamba.cli import main
from ternary_mamba.core.config import PRESETS, Mamba2Config
from ternary_mamba.core.model import Mamba2LM
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules
from ternary_mamba.quant.ternary import round_scale



def _quantize(teacher, text, out, dtype, extra=()):
    n = torch.get_num_threads()
    try:
        return main(["quantize", "--teacher", str(teacher), "--data", str(text), "--tokens", "4096", "--seq-len",
                     "64", "--batch-size", "4", "--group-size", "32", "--scale-mode", "learned", "--eval-every",
                     "0", "--final-eval-batches", "1", "--device", "cpu", "--dtype", dtype, "--threads", "1",
                     "--out", str(out), *extra])
    finally:
        torch.set_num_threads(n)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_bf16_scales_are_exact_in_every_dtype():
    s = torch.rand(1000) * 3 + 1e-5
    s[:3] = torch.tensor([65504.0, 1e-6, 70000.0])
    b = round_scale(s, "bf16")
    assert torch.equal(b.bfloat16().float(), b) and torch.equal(b.half().float(), b)
    t = torch.tensor([-1.0, 0.0, 1.0])
    assert torch.equal((b[:, None] * t).bfloat16().float(), b[:, None] * t)


def test_bf16_run_tracks_fp32_and_its_export_is_exact(tiny_teacher_dir, text_dir, tmp_path):
    assert _quantize(tiny_teacher_dir, text_dir, tmp_path / "f32", "fp32") == 0
    assert _quantize(tiny_teacher_dir, text_dir, tmp_path / "bf16", "bf16") == 0
    rec = json.loads((tmp_path / "bf16" / "run.json").read_text())["config"]
    assert rec["dtype"] == "bf16" and rec["quant"]["scale_format"] == "bf16"
    a, b = _losses(tmp_path / "f32"), _losses(tmp_path / "bf16")
    assert len(a) == len(b) == 16
    # bf16 autocast changes the arithmetic, not the trajectory: the KD loss stays within 10 % of fp32's
    assert max(abs(x - y) / max(abs(x), 1e-3) for x, y in zip(a, b)) < 0.10, (a, b)
    from ternary_mamba import load_model
    student = load_model(tmp_path / "bf16")
    assert main(["export", str(tmp_path / "bf16"), "--out", str(tmp_path / "pk")]) == 0
    packed = load_model(tmp_path / "pk")
    for name, m in ternary_modules(student):
        wq = m.quantized_weight().detach()
        assert torch.equal(wq.bfloat16().float(), wq)                  # what the bf16 forward multiplied by
        assert torch.equal(packed.get_submodule(name).dequantized_weight(), wq)   # what the file holds


def test_fp16_run_with_loss_scaling_finishes(tiny_teacher_dir, text_dir, tmp_path):
    with pytest.warns(UserWarning, match="fp16"):
        assert _quantize(tiny_teacher_dir, text_dir, tmp_path / "f16", "fp16", ["--tokens", "1024"]) == 0
    assert all(np.isfinite(_losses(tmp_path / "f16")))


def test_a_cuda_device_without_cuda_is_a_one_line_error(tiny_teacher_dir, text_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _quantize(tiny_teacher_dir, text_dir, tmp_path / "c", "fp32", ["--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_a_full_qat_kd_step_of_the_1_3b_config_on_meta(tmp_path):
    """Teacher forward (16-bit, as stored), student forward and backward, clipping, AdamW, zero-ratio monitor,
    through the real Trainer: on `meta` any tensor made on the CPU, or any C kernel reached, raises."""
    from ternary_mamba.quant.monitor import ZeroRatioMonitor
    from ternary_mamba.train.config import TrainConfig
    from ternary_mamba.train.data import PackedSequences
    from ternary_mamba.train.distill import DistillObjective
    from ternary_mamba.train.loop import Trainer
    cfg = Mamba2Config(**PRESETS["mamba2-1.3b"])
    meta = torch.device("meta")
    with meta:
        teacher = Mamba2LM(cfg, init=False)
    student = copy.deepcopy(teacher)
    quantize_(student, TernaryConfig(group_size=128, scale_mode="learned"))
    teacher = teacher.to(torch.bfloat16).eval()
    student.train()
    monitor = ZeroRatioMonitor(every=1)
    objective = DistillObjective(teacher, alpha_ce=0.5, monitor=monitor)
    data = PackedSequences(np.arange(4 * 65, dtype=np.uint16) % 1000, 64)
    trainer = Trainer(student, objective, TrainConfig(tokens=128, seq_len=64, batch_size=2, eval_every=0),
                      tmp_path, data, None, device=meta, dtype=torch.bfloat16)
    assert trainer.model is student and sum(p.numel() for p in student.parameters()) > 1.3e9
    rec = trainer.train_step()
    assert set(rec) >= {"kl", "ce", "loss", "grad_norm", "lr"}
    st = objective.monitor(student, 1)
    assert "zero_ratio_layers" in st and len(st["zero_ratio_layers"]) == cfg.n_layer
    state = trainer.opt.state[student.backbone.layers[0].mixer.in_proj.log_scale]
    assert state["exp_avg"].device.type == "meta"
    assert all(p.device.type == "meta" for p in student.parameters())


def test_c_kernels_refuse_tensors_they_were_not_written_for():
    from ternary_mamba.ops.build import get_kernel
    if get_kernel() is None:
        pytest.skip("no C compiler")
    from ternary_mamba.ops.kernels import f16_gemv, i8_gemv, tq2_dequant, tq2_gemv
    codes, scales, x = torch.zeros(4, 2, dtype=torch.uint8), torch.ones(4, 1), torch.ones(1, 8)
    assert tq2_gemv(codes, scales, x, 8).shape == (1, 4)
    for bad in (x.bfloat16(), x.half(), x.double(), x.to("meta")):
        with pytest.raises(TypeError):
            tq2_gemv(codes, scales, bad, 8)
    with pytest.raises(TypeError):
        tq2_gemv(codes.to(torch.int8), scales, x, 8)
    with pytest.raises(TypeError):
        tq2_dequant(codes, scales.half(), 8)
    with pytest.raises(TypeError):
        i8_gemv(torch.zeros(4, 8, dtype=torch.int8), scales.view(-1), x.bfloat16())
    with pytest.raises(TypeError):
        f16_gemv(torch.zeros(4, 8), x)


def test_a_16bit_teacher_keeps_its_ssm_parameters_norms_and_residual_in_fp32():
    """Only the projections of the frozen teacher go to bf16: dt_bias ~ -4..-7 would round to steps of 1/32, and
    the residual stream stays fp32 (mamba_ssm's residual_in_fp32).  Its logits stay closer to the fp32 teacher's
    than those of a teacher cast whole."""
    from conftest import random_model, tiny_config
    from ternary_mamba.ops.device import autocast
    from ternary_mamba.train.distill import frozen_teacher
    import copy
    m = random_model(tiny_config(), seed=5).eval()
    with torch.no_grad():
        for layer in m.backbone.layers:
            layer.mixer.dt_bias.uniform_(-7, -4)
    t = frozen_teacher(copy.deepcopy(m), "cpu", torch.bfloat16)
    mixer = t.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == mixer.out_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in (mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight,
                                                  mixer.conv1d.weight, t.backbone.embedding.weight, t.backbone.norm_f.weight))
    assert not any(p.requires_grad for p in t.parameters())
    whole = copy.deepcopy(m).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        ref, ours, cast = m(ids).float(), t(ids).float(), whole(ids).float()
    assert (ours - ref).abs().max() < (cast - ref).abs().max()
