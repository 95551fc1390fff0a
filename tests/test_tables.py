"""Quantized embedding + tied head (--embedding int8|q4): the codes, the kernels against the PyTorch reference,
the packed folder round trip, the decode engine, and bad files."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from ternary_mamba.errors import UserError
from ternary_mamba.runtime.load import load_model
from ternary_mamba.formats.packed import export_packed
from ternary_mamba.quant.qat import TernaryConfig, quantize_
from ternary_mamba.quant.tables import dequantize_table, quantize_table, table_bytes
from ternary_mamba.runtime.tables import QuantizedEmbedding, QuantizedHead


def test_q4_layout_and_values():
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32) - 16     # -16 .. 15
    q, s = quantize_table(w, "q4")
    assert q.shape == (1, 16) and q.dtype == torch.uint8 and s.shape == (1, 1) and s.dtype == torch.float16
    d = dequantize_table(q, s, "q4")
    # byte j holds value j (low nibble) and value j + 16 (high nibble)
    n = torch.cat([q & 15, q >> 4], 1).float() - 8
    assert torch.equal(d, n * s.float())
    assert int(q[0, 0] & 15) == int(torch.round(w[0, 0] / s.float()[0, 0]).clamp(-8, 7)) + 8
    # inside the code range [-8 s, 7 s] the error is at most half a step; outside it, values clamp to the end
    sf = s.float()[0, 0]
    inside = (w >= -8 * sf) & (w <= 7 * sf)
    assert inside.any() and ((d - w).abs()[inside] <= sf * 0.5 + 1e-6).all()
    assert torch.equal(d[~inside], torch.where(w[~inside] > 0, 7 * sf, -8 * sf))


@pytest.mark.parametrize("fmt,rel", [("int8", 0.01), ("q4", 0.095)])
def test_quantization_error_and_idempotence(fmt, rel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g)
    q, s = quantize_table(w, fmt)
    d = dequantize_table(q, s, fmt)
    assert (d - w).norm() / w.norm() < rel
    if fmt == "int8":                              # the stored values are a fixed point of the quantizer
        q2, s2 = quantize_table(d, fmt)
        assert torch.equal(dequantize_table(q2, s2, fmt), d)
    else:                                          # the q4 scale search never loses to plain absmax / 7
        amax = w.reshape(300, 3, 32).abs().amax(2, keepdim=True) / 7
        plain = (torch.round(w.reshape(300, 3, 32) / amax).clamp(-8, 7) * amax).reshape(300, 96)
        assert (d - w).norm() <= (plain - w).norm() * 1.001
    assert table_bytes(300, 96, fmt) == q.numel() * q.element_size() + s.numel() * 2


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_kernels_agree_with_reference(fmt):
    from ternary_mamba.ops.build import get_kernel
    if get_kernel() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(77, 64, generator=g)
    q, s = quantize_table(w, fmt)
    emb = QuantizedEmbedding(q, s, fmt)
    head = QuantizedHead(emb)
    ids = torch.tensor([[0, 5, 76], [3, 3, 1]])
    assert torch.equal(emb(ids), dequantize_table(q, s, fmt, ids))       # C lookup == reference, bit for bit
    table = dequantize_table(q, s, fmt)
    for nb in (1, 3, 70):                                                # 70 rows: the blocked GEMM path
        x = torch.randn(nb, 64, generator=g)
        assert torch.allclose(head(x), F.linear(x, table), atol=1e-4, rtol=1e-5)
    with pytest.raises(IndexError):
        emb(torch.tensor([77]))


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_packed_folder_with_quantized_embedding(fmt, tmp_path):
    from ternary_mamba.runtime.decode_engine import engine_for
    m = random_model(tiny_config(d_model=128, headdim=32))
    quantize_(m, TernaryConfig(group_size=128))
    export_packed(m, tmp_path / "dense", "tq2", "fp16")
    h = export_packed(m, tmp_path / fmt, "tq2", "fp16", embedding=fmt)
    assert h["format_version"] == 2 and h["embedding"] == fmt
    size = lambda f: (tmp_path / f / "model.safetensors").stat().st_size   # noqa: E731
    assert size(fmt) < size("dense") * (0.75 if fmt == "int8" else 0.65)
    p = load_model(tmp_path / fmt)
    assert isinstance(p.backbone.embedding, QuantizedEmbedding) and isinstance(p.lm_head, QuantizedHead)
    assert p.lm_head.codes.data_ptr() == p.backbone.embedding.codes.data_ptr()    # one table, not two
    dense = load_model(tmp_path / "dense")
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        out, ref = p(ids), dense(ids)
        assert (out - ref).norm() / ref.norm() < (0.02 if fmt == "int8" else 0.25)
        assert engine_for(p) is not None                                  # decoding runs in the C engine
        st = p.empty_state(2)
        for t in range(7):
            logits, st = p.step(ids[:, t], st, inplace=True)
            assert (logits - out[:, t]).abs().max() < 1e-3


def test_bad_quantized_embedding_files(tmp_path):
    from safetensors.torch import load_file, save_file
    m = random_model(tiny_config(d_model=64))
    quantize_(m, TernaryConfig(group_size=32))
    with pytest.raises(UserError, match="embedding q3"):
        export_packed(m, tmp_path / "x", "tq2", embedding="q3")
    export_packed(m, tmp_path / "p", "tq2", embedding="q4")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    with pytest.raises(UserError, match="need version 2"):
        load_model(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "p" / "model.safetensors"
    sd = load_file(str(path))
    sd["backbone.embedding.scales"] = sd["backbone.embedding.scales"][:, :1].contiguous()
    save_file(sd, str(path))
    with pytest.raises(UserError, match="embedding.scales"):
        load_model(tmp_path / "p")


def test_cli_export_info_and_ppl_with_quantized_embedding(tiny_teacher_dir, text_dir, tmp_path, capsys):
    """export --embedding q4 writes the smaller folder and says so; info shows the table; ppl scores the
    model with its table in int8 and q4 (--quantized-embedding) and the packed model through the decode path
    with int8 / bf16 activations against exact (--activations)."""
    from ternary_mamba.cli import main
    out = tmp_path / "q4"
    assert main(["export", str(tiny_teacher_dir), "--format", "tq2", "--group-size", "64", "--embedding", "q4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "embedding q4" in printed and "tq1 + q4 embedding" in printed
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "embedding.codes" in info and "embedding q4" in info
    assert main(["ppl", str(tiny_teacher_dir), "--text", str(text_dir), "--max-tokens", "300", "--seq-len", "64",
                 "--quantized-embedding"]) == 0
    lines = capsys.readouterr().out
    assert "+int8 embedding" in lines and "+q4 embedding" in lines
    assert main(["ppl", str(out), "--text", str(text_dir), "--max-tokens", "40", "--activations"]) == 0
    lines = capsys.readouterr().out
    if "not available here" in lines:            # groups of 64: int8 activations need 128, bf16 needs AVX512-BF16
        from ternary_mamba.ops.dispatch import cpu_has_bf16_kernels
        assert ("decode path, bf16" in lines) == cpu_has_bf16_kernels()
        from conftest import BUNDLED_TOKENIZER           # groups of 128: the int8-activation path runs on every CPU
        from ternary_mamba.formats.folders import save_model
        save_model(random_model(tiny_config(vocab_size=8192, d_model=128, headdim=32)), tmp_path / "fp128",
                   tokenizer_path=BUNDLED_TOKENIZER)
        assert main(["export", str(tmp_path / "fp128"), "--format", "tq2", "--group-size", "128", "--out",
                     str(tmp_path / "g128"), "--cost-tokens", "16"]) == 0
        capsys.readouterr()
        assert main(["ppl", str(tmp_path / "g128"), "--text", str(text_dir), "--max-tokens", "40",
                     "--activations"]) == 0
        lines = capsys.readouterr().out
    assert "decode path, exact" in lines and "KL to exact" in lines
    assert main(["ppl", str(tiny_teacher_dir), "--text", str(text_dir), "--activations"]) == 1
    assert "needs a packed model" in capsys.readouterr().err
