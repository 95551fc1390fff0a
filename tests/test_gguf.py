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


def test_a_gguf_export_records_the_decode_modes_cost_and_generate_reads_it(tmp_path, capsys):
    """`export --format gguf` measures each decode mode on the file as `generate` loads it and keeps the record in
    the file's metadata (nothing left beside it); `generate` picks from a file's record as from a packed folder's
    decode_modes.json and says so; a record it cannot read means the exact path."""
    import json
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.runtime.modes import GGUF_KEY, choose_mode, read_gguf_record
    save_model(random_model(tiny_config(d_model=256, n_layer=1, headdim=32, vocab_size=8192)), tmp_path / "fp",
               tokenizer_path=BUNDLED_TOKENIZER)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "fp"), "--format", "gguf", "--out", str(out), "--cost-tokens", "24"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "m.gguf"]
    rec = read_gguf_record(out)
    assert rec["tokens"] == 24 and {"exact", "a8"} <= set(rec["modes"]) and rec["modes"]["exact"]["kl"] == 0.0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Once", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert f"[decode mode: {choose_mode(rec)[1]}" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0      # info reads it from the metadata too
    said = "".join(capsys.readouterr())
    assert "decode modes (measured at export on 24 held-out tokens" in said and choose_mode(rec)[1] in said
    m = student(256)
    cheap = {"modes": {"exact": {"kl": 0.0, "top1": 1.0}, "a8": {"kl": 0.001, "top1": 0.99}}, "tokens": 5, "cpu": "x"}
    for name, value, said in (("a8.gguf", json.dumps(cheap), "[decode mode: a8: int8 activations"),
                              ("bad.gguf", "{not json", "records no measured cost"),
                              ("odd.gguf", json.dumps({"modes": {"turbo": {"kl": 0, "top1": 1}}}),
                               "records no measured cost")):
        export_gguf(m, tmp_path / name, "tq2_0", BUNDLED_TOKENIZER, metadata={GGUF_KEY: value})
        assert main(["generate", str(tmp_path / name), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
        assert said in capsys.readouterr().err, name
    assert main(["info", str(tmp_path / "bad.gguf")]) == 0 and "no measured cost recorded" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "a8.gguf"), "--prompt", "Once", "--max-new-tokens", "2", "--mode", "fast"]) == 0
    assert "(asked for; its measured cost: the file's metadata)" in capsys.readouterr().err


def test_ppl_on_a_ternary_gguf_scores_it_packed_with_the_dense_models_values(tmp_path, text_dir, capsys):
    """`ppl` (and `eval`, through the same loader) on a TQ2_0 / TQ1_0 file packs its projections on a CPU, as
    `generate` does, and scores exactly what the dense read scores."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.commands.configs import PplConfig
    from ternary_mamba.commands.evaluate import perplexity
    from ternary_mamba.eval.perplexity import text_perplexity
    from ternary_mamba.formats.text import find_text_files, read_documents
    from ternary_mamba.runtime.load import load_for_scoring, load_model_and_tokenizer
    texts = [d for f in find_text_files([str(text_dir)]) for d in read_documents(f)]
    for qtype in ("tq2_0", "tq1_0"):
        path = tmp_path / f"{qtype}.gguf"
        export_gguf(student(256, seed=len(qtype)), path, qtype, BUNDLED_TOKENIZER)
        assert getattr(load_for_scoring(path, "cpu")[0], "packed_header", None)
        got = perplexity(PplConfig(models=[str(path)], text=[str(text_dir)], seq_len=128, batch_size=2,
                                   max_tokens=512))[str(path)]
        assert "packed in memory" in capsys.readouterr().out
        dense, tok = load_model_and_tokenizer(path)
        with torch.no_grad():
            want = text_perplexity(dense, tok, texts, 128, 2, 512)
        assert got["tokens"] == want["tokens"] and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5), qtype


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
    from ternary_mamba.formats.gguf_load import load_gguf_tokenizer
    from ternary_mamba.formats.tokenizer import load_tokenizer
    export_gguf(student(256), tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    text = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry.\n<|endoftext|>"
    emb, ref = load_gguf_tokenizer(tmp_path / "m.gguf"), load_tokenizer(BUNDLED_TOKENIZER)
    assert emb.encode(text) == ref.encode(text) and emb.decode(emb.encode(text)) == text
    assert emb.eos_id == ref.eos_id
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "Once", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once")


@pytest.mark.parametrize("qtype,G", [("tq2_0", 256), ("tq1_0", 256), ("f16", 128)])
def test_a_ternary_gguf_decodes_packed_as_the_packed_folder_does(tmp_path, capsys, qtype, G):
    """generate / serve on a ternary GGUF pack its projections in memory as they are (the decode engine runs
    them): the same greedy tokens as the packed folder exported from the same student; a full-precision GGUF
    stays dense."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.formats.packed import export_packed
    from ternary_mamba.runtime.decode_engine import engine_for
    from ternary_mamba.runtime.generate import generate_text
    from ternary_mamba.runtime.load import load_for_decoding, load_model_and_tokenizer
    m = student(G)
    export_gguf(m, tmp_path / "m.gguf", qtype, BUNDLED_TOKENIZER)
    export_packed(m, tmp_path / "packed", tokenizer_path=BUNDLED_TOKENIZER)
    from ternary_mamba.formats.gguf_load import load_gguf
    from ternary_mamba.quant.qat import packed_codes
    from ternary_mamba.runtime.packed_linear import PackedTernaryLinear
    got = []

    def keep(codes, s16, G):
        got.append((codes, s16, G))
        return PackedTernaryLinear(codes, s16, codes.shape[1] * 4, G, None)
    load_gguf(tmp_path / "m.gguf", ternary=keep)
    assert len(got) == (0 if qtype == "f16" else 4)   # TQ types: the codes and scales as read, never dense
    for (codes, s16, G_), lin in zip(got, [p for layer in m.backbone.layers
                                           for p in (layer.mixer.in_proj, layer.mixer.out_proj)]):
        want_codes, want_s16 = packed_codes(lin, "tq2")
        assert G_ == 256 and torch.equal(codes.reshape(-1), want_codes) and torch.equal(s16, want_s16)
    model, tok, note = load_for_decoding(tmp_path / "m.gguf")
    assert f"groups of {G}) packed in memory" in note and model.packed_header and engine_for(model) is not None
    ref, _ = load_model_and_tokenizer(tmp_path / "packed")
    assert generate_text(model, tok, "Dorothy", 12, 0.0) == generate_text(ref, tok, "Dorothy", 12, 0.0)
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "Once", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "packed in memory" in err and "[decode mode: exact (m.gguf records no measured cost" in err
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "Once", "--max-new-tokens", "3", "--mode", "a8"]) == 0
    err = capsys.readouterr().err                 # a8 runs on the packed codes; its cost is nowhere recorded
    assert "[decode mode: a8: int8 activations" in err and "not measured for this file" in err
    export_gguf(random_model(tiny_config(vocab_size=8192)), tmp_path / "fp.gguf", "f16", BUNDLED_TOKENIZER)
    model, _, note = load_for_decoding(tmp_path / "fp.gguf")
    assert "full-precision" in note and not getattr(model, "packed_header", None)


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
    from ternary_mamba.formats.gguf_load import load_gguf_tokenizer
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


def _theirs(path):
    """{key: python value} and [(name, shape, type, bytes)] as gguf-py's own reader sees the file."""
    import numpy as np
    r = gguf.GGUFReader(path)
    fields = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        T = gguf.GGUFValueType
        def one(i, t):  # noqa: E306
            return bytes(f.parts[i]).decode() if t == T.STRING else f.parts[i].tolist()[0]
        if f.types[0] == T.ARRAY:
            fields[k] = [one(i, f.types[-1]) for i in f.data]
        else:
            fields[k] = one(f.data[0], f.types[0])
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), int(t.tensor_type),
                np.asarray(t.data).view(np.uint8).tobytes()) for t in r.tensors]
    return fields, tensors


def _plain(v):
    import numpy as np
    return v.tolist() if isinstance(v, np.ndarray) else [_plain(x) for x in v] if isinstance(v, list) else v


def test_our_reader_agrees_with_gguf_py_on_every_field_and_tensor(tmp_path):
    """formats/gguf_read.py against gguf-py's GGUFReader: our export (TQ2_0, the tokenizer) and a file with every
    value type, an array of arrays, a non-default alignment and a tensor of each type we accept."""
    import numpy as np
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.formats.gguf_load import read_gguf_file
    export_gguf(student(256), tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    T, Q = gguf.GGUFValueType, gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "mamba2")
    w.add_custom_alignment(64)
    for i, (t, v) in enumerate([(T.UINT8, 7), (T.INT8, -7), (T.UINT16, 65535), (T.INT16, -300), (T.UINT32, 2**32 - 1),
                                (T.INT32, -2**31), (T.FLOAT32, 0.5), (T.BOOL, True), (T.UINT64, 2**64 - 1),
                                (T.INT64, -2**63), (T.FLOAT64, -1e300), (T.STRING, "héllo")]):
        w.add_key_value(f"k.{i}", v, t)
        w.add_key_value(f"a.{i}", [v, v], T.ARRAY, t)
    w.add_key_value("nested", [[1, 2], [3]], T.ARRAY, T.ARRAY)
    rng = np.random.default_rng(0)
    for qt in (Q.F32, Q.F16, Q.Q8_0, Q.TQ2_0):
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        w.add_tensor(f"t.{qt.name}", rng.integers(0, 256, (3, 2 * nbytes), dtype=np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for pad in range(8):   # the default alignment, whatever the length of the metadata before the data
        w = gguf.GGUFWriter(tmp_path / f"p{pad}.gguf", "mamba2")
        w.add_key_value("pad", "x" * (5 * pad), T.STRING)
        w.add_tensor("t", np.arange(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    for name in ["m.gguf", "x.gguf"] + [f"p{pad}.gguf" for pad in range(8)]:
        fields, tensors = _theirs(tmp_path / name)
        ours = read_gguf_file(tmp_path / name, gguf)
        got = {k: _plain(v) for k, (v, _) in ours.fields.items()}
        if name == "x.gguf":   # gguf-py flattens nested arrays into parts; compare those apart
            assert got.pop("nested") == [[1, 2], [3]]
            fields.pop("nested")
            assert got["k.6"] == 0.5 and got["k.11"] == "héllo" and got["a.8"] == [2**64 - 1] * 2
        assert got == fields
        assert [(t.name, t.shape, t.ggml_type, t.data.tobytes()) for t in ours.tensors] == tensors


def test_a_tq2_0_block_with_the_fourth_code_stays_dense(tmp_path):
    """TQ2_0 can hold q = 3, i.e. (3 - 1) d: not ternary.  Such a projection is read densely (its value 2 d kept),
    the others packed as read."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.formats.gguf_load import load_gguf
    from ternary_mamba.runtime.load import load_for_decoding
    from ternary_mamba.runtime.packed_linear import PackedTernaryLinear
    m = student(256)
    export_gguf(m, tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    t = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ssm_in.weight")
    raw = bytearray((tmp_path / "m.gguf").read_bytes())
    raw[t.data_offset] = 0xFF                     # weights 0, 32, 64, 96 of row 0: q = 3
    (tmp_path / "m.gguf").write_bytes(bytes(raw))
    dense = load_gguf(tmp_path / "m.gguf")
    w = dense.backbone.layers[0].mixer.in_proj.weight
    s = m.backbone.layers[0].mixer.in_proj.export()[1][0, 0].float()
    assert torch.equal(w[0, [0, 32, 64, 96]], torch.full((4,), 2 * s.item()))
    model, tok, note = load_for_decoding(tmp_path / "m.gguf")
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert not isinstance(mixers[0].in_proj, PackedTernaryLinear)
    assert all(isinstance(p, PackedTernaryLinear) for p in (mixers[0].out_proj, mixers[1].in_proj, mixers[1].out_proj))
    with torch.no_grad():
        assert (model(torch.tensor([[1, 2, 3]])) - dense(torch.tensor([[1, 2, 3]]))).abs().max() < 1e-4
