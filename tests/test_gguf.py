"""GGUF export (llama.cpp's mamba2 layout, TQ2_0 / TQ1_0 / F16 ternary projections) and loading it back."""
import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.formats.folders import save_model
from ternary_mamba.runtime.load import load_model
from ternary_mamba.cli import main
from ternary_mamba.errors import UserError
from ternary_mamba.quant.qat import TernaryConfig, quantize_

gguf = pytest.importorskip("gguf")
from ternary_mamba.formats.gguf import export_gguf  # noqa: E402


def student(G: int, seed: int = 0, **kw):
    m = random_model(tiny_config(d_model=256, n_layer=2, headdim=32, vocab_size=8192, **kw), seed=seed)
    quantize_(m, TernaryConfig(group_size=G))
    with torch.no_grad():  # GGUF holds the embedding in fp16
        m.backbone.embedding.weight.copy_(m.backbone.embedding.weight.half().float())
    return m


@pytest.mark.parametrize("qtype,G", [("tq2_0", 256), ("tq1_0", 256), ("f16", 128), ("tq2_0", -1)])
def test_gguf_round_trip_is_exact(tmp_path, qtype, G):
    from conftest import BUNDLED_TOKENIZER
    m = student(G, seed=len(qtype) + G, ngroups=2 if qtype == "f16" else 1)
    with torch.no_grad():  # an all-zero block must survive too
        m.backbone.layers[0].mixer.out_proj.weight[:, :256] = 0
    types = export_gguf(m, tmp_path / "m.gguf", qtype, BUNDLED_TOKENIZER)
    assert types["blk.0.ssm_in.weight"] == {"tq2_0": "TQ2_0", "tq1_0": "TQ1_0", "f16": "float16"}[qtype]
    back = load_model(tmp_path / "m.gguf")
    for a, b in zip(m.backbone.layers, back.backbone.layers):
        assert torch.equal(a.mixer.in_proj.quantized_weight(), b.mixer.in_proj.weight)
        assert torch.equal(a.mixer.out_proj.quantized_weight(), b.mixer.out_proj.weight)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (m(ids) - back(ids)).abs().max().item() <= 1e-5   # A is stored as -exp(A_log)


def test_gguf_metadata_and_vocab(tmp_path):
    from conftest import BUNDLED_TOKENIZER
    m = student(256)
    export_gguf(m, tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = r.fields
    val = lambda k: f[k].parts[f[k].data[0]]  # noqa: E731
    assert bytes(val("general.architecture")).decode() == "mamba2"
    assert val("mamba2.ssm.inner_size").item() == 512 and val("mamba2.ssm.time_step_rank").item() == 16
    assert len(f["tokenizer.ggml.tokens"].data) == m.backbone.embedding.weight.shape[0]
    assert {t.name for t in r.tensors} >= {"token_embd.weight", "blk.1.ssm_a", "blk.1.ssm_norm.weight"}
    assert "output.weight" not in {t.name for t in r.tensors}  # tied head stored once


def test_gguf_refuses_inexact_and_bad_input(tmp_path, capsys):
    from conftest import BUNDLED_TOKENIZER
    with pytest.raises(UserError, match="groups of 128"):
        export_gguf(student(128), tmp_path / "a.gguf", "tq2_0", BUNDLED_TOKENIZER)
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="not ternary"):
        export_gguf(random_model(tiny_config()), tmp_path / "b.gguf", "tq2_0", BUNDLED_TOKENIZER)
    with pytest.raises(UserError, match="does not belong"):   # 8k tokenizer, 512-token model
        export_gguf(random_model(tiny_config()), tmp_path / "b.gguf", "f16", BUNDLED_TOKENIZER)
    assert not list(tmp_path.iterdir())
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not a readable GGUF"):
        load_model(tmp_path / "bad.gguf")


def test_export_cli_gguf(tmp_path, capsys):
    from conftest import BUNDLED_TOKENIZER
    save_model(random_model(tiny_config(d_model=256, n_layer=1, headdim=32, vocab_size=8192)), tmp_path / "fp",
               tokenizer_path=BUNDLED_TOKENIZER)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "fp"), "--format", "gguf", "--out", str(out)]) == 0
    assert "TQ2_0" in capsys.readouterr().out and out.stat().st_size > 0
    before = out.read_bytes()
    assert main(["export", str(tmp_path / "fp"), "--format", "gguf", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_full_precision_model_as_f32_gguf_is_exact(tmp_path):
    from conftest import BUNDLED_TOKENIZER
    m = random_model(tiny_config(d_model=128, n_layer=2, headdim=32, vocab_size=8192, tie_embeddings=False), seed=3)
    types = export_gguf(m, tmp_path / "fp.gguf", "f32", BUNDLED_TOKENIZER)
    assert types["output.weight"] == "float32"
    back = load_model(tmp_path / "fp.gguf")
    ids = torch.randint(0, 512, (1, 33))
    with torch.no_grad():
        assert (m(ids) - back(ids)).abs().max().item() <= 1e-5


def test_generate_from_a_gguf_file_uses_its_embedded_tokenizer(tmp_path, capsys):
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.formats.gguf import load_gguf_tokenizer
    from ternary_mamba.formats.tokenizer import load_tokenizer
    export_gguf(student(256), tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    text = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry.\n<|endoftext|>"
    emb, ref = load_gguf_tokenizer(tmp_path / "m.gguf"), load_tokenizer(BUNDLED_TOKENIZER)
    assert emb.encode(text) == ref.encode(text) and emb.decode(emb.encode(text)) == text
    assert emb.eos_id == ref.eos_id
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "Once", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once")


def _tokenizer_gguf(path, tokens, types=True, merges=("a b",)):
    w = gguf.GGUFWriter(str(path), "mamba2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    if types:
        w.add_token_types([1] * len(tokens))
    w.add_token_merges(list(merges))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case,msg", [("no token types", "token_type is missing"),
                                      ("a merge without a space", "not two tokens separated by a space"),
                                      ("a token that is not UTF-8", "not UTF-8")])
def test_a_bad_embedded_tokenizer_is_one_line(tmp_path, case, msg):
    from ternary_mamba.formats.gguf import load_gguf_tokenizer
    tokens = ["a", "b", "ab"]
    kw = {}
    if case == "no token types":
        kw["types"] = False
    elif case == "a merge without a space":
        kw["merges"] = ("ab",)
    else:
        tokens = [b"a", b"\xff\xfe", b"ab"]
    p = _tokenizer_gguf(tmp_path / "t.gguf", tokens, **kw)
    with pytest.raises(UserError, match=msg):
        load_gguf_tokenizer(p)
