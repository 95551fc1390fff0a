"""A fuzz harness for every untrusted file the package reads: config.json in its three dialects, packed headers
and codes, safetensors headers and index files, GGUF files.  Each mutated input must either load (and then
give finite logits) or raise `UserError` — never another exception, a crash, or an out-of-bounds read (the
ASan job runs these cases against an AddressSanitizer build of the kernels: scripts/test_asan.sh).

A fixed-seed run of a few hundred cases is part of the suite; FUZZ_EXAMPLES=5000 (slow marker) runs longer."""
import json
import os
import shutil
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import BUNDLED_TOKENIZER, random_model, tiny_config  # noqa: E402
from ternary_mamba.errors import UserError  # noqa: E402
from ternary_mamba.formats.configs import config_from_dict  # noqa: E402
from ternary_mamba.runtime.load import load_model  # noqa: E402

N = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
IDS = torch.tensor([[1, 5, 9, 200, 3, 7, 11, 2]])

ODD = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))


def _load_outcome(path) -> str:
    """The contract: a UserError ("refused"), or a model that runs with finite logits ("finite") — or, when
    finite but extreme values survived the load checks (an A_log of 1e4 overflows exp), non-finite logits that
    every consumer refuses with a UserError ("refused when used").  Anything else raises out of here."""
    try:
        m = load_model(path)
    except UserError:
        return "refused"
    with torch.no_grad():
        out = m(IDS % m.config.vocab_size)
    if torch.isfinite(out).all():
        return "finite"
    from ternary_mamba.runtime.generate import sample_next
    try:
        sample_next(out[:, -1], 0.0, 1.0, torch.Generator())
    except UserError as e:
        return "refused when used" if "NaN or infinite logits" in str(e) else "wrong error"
    return "non-finite logits accepted"


CLEAN = {"refused", "finite", "refused when used"}


def _mutate(d: dict, data) -> dict:
    d = json.loads(json.dumps(d))
    for _ in range(data.draw(st.integers(1, 3))):
        keys = list(d)
        action = data.draw(st.sampled_from(["set", "drop", "add", "nested"]))
        if action == "drop" and keys:
            d.pop(data.draw(st.sampled_from(keys)))
        elif action == "add":
            d[data.draw(st.text(max_size=6))] = data.draw(ODD)
        elif action == "nested" and any(isinstance(v, dict) and v for v in d.values()):
            k = data.draw(st.sampled_from([k for k in keys if isinstance(d[k], dict) and d[k]]))
            d[k] = _mutate(d[k], data)
        elif keys:
            d[data.draw(st.sampled_from(keys))] = data.draw(ODD)
    return d


OURS = {"format": "ternary-mamba", "architecture": "mamba2", "config": tiny_config().to_dict()}
MAMBA_SSM = {"d_model": 64, "n_layer": 2, "vocab_size": 512, "pad_vocab_size_multiple": 16,
             "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16}, "tie_embeddings": True}
HF = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512, "state_size": 16,
      "head_dim": 16, "n_groups": 1, "expand": 2, "num_heads": 8, "conv_kernel": 4}


@FUZZ
@given(st.sampled_from([OURS, MAMBA_SSM, HF]), st.data())
def test_config_json_in_all_three_dialects(base, data):
    d = _mutate(base, data)
    try:
        cfg = config_from_dict(d, "config.json")
    except UserError:
        return
    assert cfg.n_params > 0 and cfg.chunk_size <= 1024


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    from ternary_mamba.formats.packed import export_packed
    from ternary_mamba.quant.qat import TernaryConfig, quantize_
    m = random_model(tiny_config())
    quantize_(m, TernaryConfig(group_size=32))
    d = tmp_path_factory.mktemp("packed") / "p"
    export_packed(m, d, "tq2", "fp16", BUNDLED_TOKENIZER)
    return d


def _copy(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("case") / "m"
    shutil.copytree(src, d)
    return d


@FUZZ
@given(st.data())
def test_packed_headers(packed_dir, tmp_path_factory, data):
    d = _copy(packed_dir, tmp_path_factory)
    h = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(_mutate(h, data)))
    assert _load_outcome(d) in CLEAN


def _safetensors_parts(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path, header, body):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + body)


@FUZZ
@given(st.data())
def test_packed_tensor_bytes_and_safetensors_headers(packed_dir, tmp_path_factory, data):
    d = _copy(packed_dir, tmp_path_factory)
    f = d / "model.safetensors"
    header, body = _safetensors_parts(f)
    if data.draw(st.booleans()):            # flip bytes of the data (codes, scales, other tensors)
        body = bytearray(body)
        for _ in range(data.draw(st.integers(1, 8))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(body)
    else:                                   # mutate one tensor's dtype / shape / offsets in the header
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name] = _mutate(header[name], data)
    _write_safetensors(f, header, body)
    assert _load_outcome(d) in CLEAN


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    from ternary_mamba.formats.folders import save_model
    d = tmp_path_factory.mktemp("sharded") / "s"
    save_model(random_model(tiny_config()), d, tokenizer_path=BUNDLED_TOKENIZER)
    header, _ = _safetensors_parts(d / "model.safetensors")
    os.rename(d / "model.safetensors", d / "shard-1.safetensors")
    index = {"weight_map": {k: "shard-1.safetensors" for k in header if k != "__metadata__"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d.parent / "outside.safetensors").write_bytes((d / "shard-1.safetensors").read_bytes())
    return d


@FUZZ
@given(st.data())
def test_index_files(sharded_dir, tmp_path_factory, data):
    d = _copy(sharded_dir, tmp_path_factory)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    choice = data.draw(st.sampled_from(["mutate", "escape", "absolute"]))
    if choice == "mutate":
        index = _mutate(index, data)
    else:
        shard = "../outside.safetensors" if choice == "escape" else str(sharded_dir.parent / "outside.safetensors")
        index["weight_map"] = {k: shard for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        load_model(d)
    except UserError as e:
        assert choice == "mutate" or "outside the model folder" in str(e)
        return
    assert choice == "mutate"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    from ternary_mamba.formats.gguf import export_gguf
    from ternary_mamba.quant.qat import TernaryConfig, quantize_
    m = random_model(tiny_config(vocab_size=8192))
    quantize_(m, TernaryConfig(group_size=32))
    p = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(m, p, "f16", BUNDLED_TOKENIZER)
    return p


@FUZZ
@given(st.data())
def test_gguf_files(gguf_file, tmp_path_factory, data):
    raw = bytearray(gguf_file.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        # mostly the metadata and tensor-info region at the start, sometimes the tensor data
        hi = len(raw) - 1 if data.draw(st.booleans()) else min(len(raw) - 1, 4096)
        raw[data.draw(st.integers(0, hi))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]       # truncated
    p = tmp_path_factory.mktemp("g") / "m.gguf"
    p.write_bytes(bytes(raw))
    assert _load_outcome(p) in CLEAN


@pytest.mark.slow
def test_a_longer_fuzz_run():
    """FUZZ_EXAMPLES=2000 for every target (a few minutes)."""
    import subprocess
    import sys
    env = {**os.environ, "FUZZ_EXAMPLES": "2000"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
