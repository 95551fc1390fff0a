"""Re-importing our own ternary exports is exact: a transformers folder or a GGUF file read back holds projections
that are scale x {-1, 0, +1}; `export` packs them as they are instead of re-quantizing them with absmean PTQ."""
import pytest
import torch

from conftest import BUNDLED_TOKENIZER, random_model, tiny_config
from ternary_mamba.cli import main
from ternary_mamba.formats.folders import save_model
from ternary_mamba.ops.dispatch import reference_path
from ternary_mamba.quant.adopt import adopt_ternary_, ternary_scales
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules
from ternary_mamba.runtime.load import load_model


def _student(tmp_path, G, **kw):
    m = random_model(tiny_config(**kw), seed=2)
    quantize_(m, TernaryConfig(group_size=G, scale_mode="learned"))
    with torch.no_grad():
        for _, t in ternary_modules(m):
            t.log_scale.add_(torch.empty_like(t.log_scale).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1)))
        m.backbone.embedding.weight.copy_(m.backbone.embedding.weight.half().float())
    save_model(m, tmp_path / "student", tokenizer_path=BUNDLED_TOKENIZER)
    return m


def _logit_gap(a, b) -> float:
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    with reference_path(), torch.no_grad():
        return float((load_model(a)(ids) - load_model(b)(ids)).abs().max())


@pytest.mark.parametrize("hf_dtype", ["fp32", "fp16"])
def test_a_transformers_export_packs_back_exactly(tmp_path, capsys, hf_dtype):
    _student(tmp_path, 32)
    assert main(["export", str(tmp_path / "student"), "--format", "tq2", "--other-dtype", "fp32",
                 "--out", str(tmp_path / "direct")]) == 0
    assert main(["export", str(tmp_path / "student"), "--format", "hf", "--hf-dtype", hf_dtype,
                 "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "hf"), "--format", "tq2", "--other-dtype", "fp32",
                 "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "already ternary (groups of 32)" in out and "absmean PTQ" not in out
    if hf_dtype == "fp32":   # the other weights pass through transformers' layout (fp16 rounds them too)
        assert _logit_gap(tmp_path / "direct", tmp_path / "again") < 1e-4
    a, b = load_model(tmp_path / "direct"), load_model(tmp_path / "again")
    for (n, x), (_, y) in zip(a.named_modules(), b.named_modules()):
        if hasattr(x, "codes"):
            assert torch.equal(x.codes, y.codes) and torch.equal(x.scales, y.scales), n


def test_a_gguf_tq2_file_packs_back_exactly(tmp_path, capsys):
    pytest.importorskip("gguf")
    _student(tmp_path, 256, d_model=256, headdim=32, vocab_size=8192)
    assert main(["export", str(tmp_path / "student"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", str(tmp_path / "student"), "--format", "tq2", "--out", str(tmp_path / "direct")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.gguf"), "--format", "tq2", "--out", str(tmp_path / "again")]) == 0
    assert "already ternary (groups of 256)" in capsys.readouterr().out
    a, b = load_model(tmp_path / "direct"), load_model(tmp_path / "again")
    for (n, x), (_, y) in zip(a.named_modules(), b.named_modules()):
        if hasattr(x, "codes"):
            assert torch.equal(x.codes, y.codes) and torch.equal(x.scales, y.scales), n


def test_full_precision_weights_are_not_adopted():
    m = random_model(tiny_config(), seed=0)
    assert adopt_ternary_(m) is None and getattr(m, "ternary_config", None) is None
    w = torch.tensor([[0.5, -0.5, 0.0, 0.5], [0.25, 0.0, 0.0, -0.25]])
    assert torch.equal(ternary_scales(w, 4), torch.tensor([[0.5], [0.25]]))
    assert ternary_scales(w + 1e-3, 4) is None
