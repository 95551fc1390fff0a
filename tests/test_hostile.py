"""Bad input as a hostile user would bring it: corrupt and tampered files, bad configs, bad corpora, bad numbers,
bad paths.  Every case ends in one line on stderr and exit code 1, with no traceback, and leaves what existed
before untouched."""
import json
import shutil
import struct

import pytest
import torch

from conftest import BUNDLED_TOKENIZER, random_model, tiny_config
from ternary_mamba.assets import TEACHER
from ternary_mamba.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_teacher_dir):
    from ternary_mamba.formats.packed import export_packed
    from ternary_mamba.quant.qat import TernaryConfig, quantize_
    d = tmp_path_factory.mktemp("hostile")
    m = random_model(tiny_config(vocab_size=8192))
    quantize_(m, TernaryConfig(group_size=32))
    export_packed(m, d / "packed", "tq2", "fp16", BUNDLED_TOKENIZER)
    (d / "text").mkdir()
    (d / "text" / "a.txt").write_text("Some text to train on. " * 400)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def _save_safetensors(path, header, body):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(body))


def _case_code3(d, files):
    p = _copy(files / "packed", d / "p")
    header, body = _safetensors(p / "model.safetensors")
    name = next(k for k in header if k.endswith(".codes"))
    body[header[name]["data_offsets"][0]] = 0xFF                 # four 2-bit fields equal to 3
    _save_safetensors(p / "model.safetensors", header, body)
    return ["generate", str(p), "--prompt", "Hi", "--max-new-tokens", "2"], "invalid tq2 byte"


def _case_nan_scale(d, files):
    p = _copy(files / "packed", d / "p")
    header, body = _safetensors(p / "model.safetensors")
    name = next(k for k in header if k.endswith(".scales"))
    o = header[name]["data_offsets"][0]
    body[o:o + 2] = b"\x00\x7e"                                    # fp16 NaN
    _save_safetensors(p / "model.safetensors", header, body)
    return ["generate", str(p), "--prompt", "Hi", "--max-new-tokens", "2"], "NaN or infinite"


def _case_bias(d, files):
    p = _copy(files / "packed", d / "p")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(p / "model.safetensors"))
    sd["backbone.layers.0.mixer.in_proj.bias"] = torch.zeros(1)
    meta = json.loads((p / "config.json").read_text())
    save_file(sd, str(p / "model.safetensors"), metadata={"ternary_mamba": json.dumps(meta)})
    return ["generate", str(p), "--prompt", "Hi", "--max-new-tokens", "2"], "in_proj.bias has shape"


def _case_header(d, files):
    p = _copy(files / "packed", d / "p")
    h = json.loads((p / "config.json").read_text())
    h["ternary"] = {"backbone.layers.0.mixer.in_proj": 1}
    (p / "config.json").write_text(json.dumps(h))
    return ["generate", str(p), "--prompt", "Hi"], "needs \"shape\""


def _config_case(field, value, msg):
    def make(d, files):
        cfg = dict(tiny_config().to_dict())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps({"format": "ternary-mamba", "config": cfg}))
        return ["info", str(d / "config.json")], msg
    return make


def _case_ssm_cfg(d, files):
    (d / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": 512, "ssm_cfg": "x"}))
    return ["info", str(d / "config.json")], "ssm_cfg must be an object"


def _index_case(weight_map, msg):
    def make(d, files, tiny_teacher_dir=None):
        p = d / "m"
        from ternary_mamba.formats.folders import save_model
        save_model(random_model(tiny_config(vocab_size=8192)), p, tokenizer_path=BUNDLED_TOKENIZER)
        (p / "model.safetensors").rename(p / "s1.safetensors")
        (p / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return ["generate", str(p), "--prompt", "Hi"], msg
    return make


def _corpus_case(content: bytes, msg):
    def make(d, files):
        (d / "c").mkdir()
        (d / "c" / "x.txt").write_bytes(content)
        return ["tokenizer", "train", "--data", str(d / "c"), "--out", str(d / "tok.json")], msg
    return make


def _set_quant(folder, value):
    meta = json.loads((folder / "config.json").read_text())
    meta["quantization"] = value
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def _run_folder(d, metrics: str | None, summary: dict | None = None):
    """A run folder as a finished run leaves it, with the given metrics.jsonl (None: a folder in its place)."""
    r = d / "r"
    r.mkdir()
    (r / "run.json").write_text(json.dumps({"command": "quantize", "config": {}}))
    if metrics is None:
        (r / "metrics.jsonl").mkdir()
    else:
        (r / "metrics.jsonl").write_text(metrics)
    if summary is not None:
        (r / "summary.json").write_text(json.dumps(summary))
    return r


def _eval_rows(d, files, row: dict):
    """An evals folder whose arc_easy file holds this row; the command that scores it."""
    (d / "ev" / "arc_easy").mkdir(parents=True)
    (d / "ev" / "arc_easy" / "ARC-Easy-Test.jsonl").write_text(json.dumps(row) + "\n")
    return ["eval", str(files / "packed"), "--tasks", "arc_easy", "--data-dir", str(d / "ev")]


def _gguf_with_extra_tensor(d, files, name: str, qtype: str = "F32"):
    """A valid f16 GGUF of a tiny model plus one more tensor."""
    import gguf
    from ternary_mamba.formats.gguf import export_gguf
    import numpy as np
    src = d / "src.gguf"
    export_gguf(random_model(tiny_config(vocab_size=8192)), src, "f16", BUNDLED_TOKENIZER)
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(d / "m.gguf", "mamba2")
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data.copy(), raw_dtype=t.tensor_type)
    if qtype == "F32":
        w.add_tensor(name, np.zeros((4, 32), dtype=np.float32))
    else:   # a tensor type no mamba2 file holds (the bytes of one Q5_K block-row)
        w.add_tensor(name, np.zeros((1, 176), dtype=np.uint8), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    src.unlink()
    return ["generate", str(d / "m.gguf"), "--prompt", "Hi", "--max-new-tokens", "2"]


def _quantize(files, d, *extra):
    return ["quantize", "--data", str(files / "text"), "--out", str(d / "run"), *extra]


CASES = {
    "packed: code 3": _case_code3,
    "packed: NaN scale": _case_nan_scale,
    "packed: one-element bias": _case_bias,
    "packed: malformed header": _case_header,
    "config: norm_eps a string": _config_case("norm_eps", "tiny", "norm_eps must be a positive number"),
    "config: chunk_size 2^20": _config_case("chunk_size", 2 ** 20, "chunk_size 1048576: at most 1024"),
    "config: d_model a list": _config_case("d_model", [64], "d_model must be a positive integer"),
    "config: ssm_cfg a string": _case_ssm_cfg,
    "index: weight_map a list": _index_case(["s1.safetensors"], "weight_map must be"),
    "index: shard outside the folder": _index_case({"backbone.norm_f.weight": "../x.safetensors"}, "outside"),
    "corpus: binary": _corpus_case(b"\x00\x01\x02" * 500, "binary"),
    "corpus: not UTF-8": _corpus_case("caf\xe9 ".encode("latin-1") * 500, "not UTF-8"),
    "corpus: empty": _corpus_case(b"", "a tokenizer needs a real corpus"),
    "flag: --chunk-size 1048576": lambda d, f: (_quantize(f, d, "--chunk-size", "1048576"), "at most 1024"),
    "flag: --threads 0": lambda d, f: (_quantize(f, d, "--threads", "0"), "--threads must be >= 1"),
    "flag: --seq-len 0": lambda d, f: (_quantize(f, d, "--seq-len", "0"), "--seq-len must be >= 1"),
    "flag: --batch-size -1": lambda d, f: (_quantize(f, d, "--batch-size", "-1"), "--batch-size must be >= 1"),
    "flag: --save-every 0": lambda d, f: (_quantize(f, d, "--save-every", "0"), "--save-every must be >= 1"),
    "flag: --group-size 0": lambda d, f: (_quantize(f, d, "--group-size", "0"), "group size 0"),
    "path: --out an existing file": lambda d, f: ((d / "run").write_text("mine") and _quantize(f, d), "is a file"),
    "path: --resume without a checkpoint": lambda d, f: (((d / "run").mkdir(), (d / "run" / "run.json").write_text(
        json.dumps({"command": "quantize", "config": {}})))[-1] and _quantize(f, d, "--resume"),
        "different config|no checkpoint"),
    "path: a one-slash path that does not exist": lambda d, f: (
        ["generate", str(d / "nope" / "x"), "--prompt", "Hi"], "no such folder"),
    "flag: --lr nan": lambda d, f: (_quantize(f, d, "--lr", "nan"), "--lr nan: must be a finite number"),
    "flag: --warmup-frac nan": lambda d, f: (_quantize(f, d, "--warmup-frac", "nan"), "must be a finite number"),
    "flag: --warmup-frac 2": lambda d, f: (_quantize(f, d, "--warmup-frac", "2"), "must be <= 1"),
    "flag: --tau inf": lambda d, f: (_quantize(f, d, "--tau", "inf"), "--tau inf: must be a finite number"),
    "flag: --grad-clip 0": lambda d, f: (_quantize(f, d, "--grad-clip", "0"), "--grad-clip 0.0: must be > 0"),
    "config file: YAML alias bomb": lambda d, f: (
        (d / "bomb.yaml").write_text('a: &a ["x","x"]\nb: &b [*a,*a]\nc: [*b,*b]\n') and
        _quantize(f, d, "--config", str(d / "bomb.yaml")), "aliases"),
    "config file: endless (/dev/zero)": lambda d, f: (_quantize(f, d, "--config", "/dev/zero"), "larger than"),
    "config file: a folder": lambda d, f: ((d / "cfgdir").mkdir() or _quantize(f, d, "--config", str(d / "cfgdir")),
                                           "is a folder"),
    "plan: --peak-tflops 0": lambda d, f: (["plan", "--peak-tflops", "0"], "must be a positive number"),
    "plan: --peak-tflops nan": lambda d, f: (["plan", "--peak-tflops", "nan"], "must be a positive number"),
    "plan: --seq-len 10^12": lambda d, f: (["plan", "--seq-len", str(10 ** 12)], "more tokens per micro-batch"),
    "plan: --batch-size 10^15": lambda d, f: (["plan", "--batch-size", str(10 ** 15)], "more tokens per micro-batch"),
    "push: repo id owner/": lambda d, f: (["push", str(f / "packed"), "owner/", "--dry-run"], "OWNER/NAME"),
    "data: jsonl text null": lambda d, f: ((d / "c").mkdir() or (d / "c" / "a.jsonl").write_text('{"text": null}\n')
                                           and ["quantize", "--data", str(d / "c"), "--out", str(d / "run")],
                                           "a.jsonl:1: \"text\" must be a string, got NoneType"),
    "data: jsonl text a number": lambda d, f: ((d / "c").mkdir() or (d / "c" / "a.jsonl").write_text('{"text": 3}\n')
                                             and ["quantize", "--data", str(d / "c"), "--out", str(d / "run")],
                                             "must be a string, got int"),
    "data: jsonl line a list": lambda d, f: ((d / "c").mkdir() or (d / "c" / "a.jsonl").write_text('[1, 2]\n')
                                           and ["quantize", "--data", str(d / "c"), "--out", str(d / "run")],
                                           "expected a JSON object"),
    "packed: truncated (info)": lambda d, f: (_copy(f / "packed", d / "p") and (d / "p" / "model.safetensors").write_bytes(
        (d / "p" / "model.safetensors").read_bytes()[:5000]) and ["info", str(d / "p")], "not a readable safetensors"),
    "run: metrics line a list": lambda d, f: (_run_folder(d, '[1, 2]\n{"step": 1, "loss": 1.0}\n') and
                                            ["report", str(d / "r")], "metrics.jsonl:1: expected a JSON object"),
    "run: metrics loss a string": lambda d, f: (_run_folder(d, '{"step": 1, "loss": "bad"}\n{"step": 2}\n') and
                                              ["report", str(d / "r")], "'loss' must be a number"),
    "run: metrics step true": lambda d, f: (_run_folder(d, '{"step": true, "loss": 1.0}\n{"step": 2}\n') and
                                          ["report", str(d / "r")], "\"step\" must be a non-negative integer"),
    "run: metrics.jsonl a folder": lambda d, f: (_run_folder(d, None) and ["report", str(d / "r")], "is a folder"),
    "run: summary row ppl a string": lambda d, f: (_run_folder(d, '{"step": 1}\n', {"rows": {"x": {"ppl": "no"}}})
                                                 and ["info", str(d / "r")], "'ppl' must be a finite number"),
    "config: quantization 'yes'": lambda d, f: (_copy(TEACHER, d / "t") and _set_quant(d / "t", "yes") and
                                               ["generate", str(d / "t"), "--prompt", "Hi"],
                                               "quantization: expected an object"),
    "eval: gold beyond the choices": lambda d, f: (_eval_rows(d, f, {"question": "q", "choices": ["a", "b"], "gold": 5}),
                                                  "2 choices and gold 5: not a valid row"),
    "eval: no choices": lambda d, f: (_eval_rows(d, f, {"question": "q", "choices": [], "gold": 0}),
                                      "0 choices"),
    "eval: task file not UTF-8": lambda d, f: (((d / "ev" / "arc_easy").mkdir(parents=True),
                                                (d / "ev" / "arc_easy" / "ARC-Easy-Test.jsonl").write_bytes(b"\xff\xfe{}"),
                                                ["eval", str(f / "packed"), "--tasks", "arc_easy", "--data-dir",
                                                 str(d / "ev")])[-1], "not UTF-8"),
    "gguf: a tensor no mamba2 model has": lambda d, f: (_gguf_with_extra_tensor(d, f, "blk.0.attn_q.weight"),
                                                        "not part of a 2-layer mamba2 model"),
    "gguf: a tensor of a foreign type": lambda d, f: (_gguf_with_extra_tensor(d, f, "blk.9.x", "Q5_K"),
                                                      "has type .*a mamba2 file holds"),
    "json: config.json nested 10^5 deep": lambda d, f: (_copy(f / "packed", d / "p") and
                                                        (d / "p" / "config.json").write_text("[" * 100000 + "]" * 100000)
                                                        and ["info", str(d / "p")], "nested too deeply"),
    "json: config.json a folder": lambda d, f: (_copy(f / "packed", d / "p") and
                                                ((d / "p" / "config.json").unlink() or (d / "p" / "config.json").mkdir())
                                                or ["info", str(d / "p")], "is a folder|not a model"),
    "os: --data a symlink loop": lambda d, f: (((d / "l1").symlink_to(d / "l2"), (d / "l2").symlink_to(d / "l1"),
                                                _quantize(f, d)[:2] + [str(d / "l1")] + _quantize(f, d)[3:])[-1],
                                               "l1: Too many levels of symbolic links"),
    "os: --config a symlink loop": lambda d, f: (((d / "l1").symlink_to(d / "l2"), (d / "l2").symlink_to(d / "l1"),
                                                  _quantize(f, d, "--config", str(d / "l1")))[-1], "symbolic links"),
    "os: --out name too long": lambda d, f: (_quantize(f, d)[:-1] + [str(d / ("x" * 300))], "File name too long"),
    "os: model path too long": lambda d, f: (["generate", str(d / ("y" * 300)), "--prompt", "Hi"],
                                             "File name too long|no such folder"),
    "config: d_model 65536 (52 B parameters)": lambda d, f: (
        (d / "big.json").write_text('{"d_model": 65536, "n_layer": 2, "vocab_size": 8192, "d_state": 64}') and
        ["pretrain", "--model-config", str(d / "big.json"), "--tokenizer", str(BUNDLED_TOKENIZER), "--data",
         str(f / "text"), "--out", str(d / "run")], "beyond this toolkit's limits.*TERNARY_MAMBA_ALLOW_LARGE=1"),
    "flag: --tokens 0": lambda d, f: (_quantize(f, d, "--tokens", "0"), "--tokens must be >= 1"),
    "flag: --tokens -5": lambda d, f: (_quantize(f, d, "--tokens", "-5"), "--tokens must be >= 1"),
    "flag: --lr -1": lambda d, f: (_quantize(f, d, "--lr", "-1"), "--lr -1.0: must be > 0"),
    "flag: --tau 0": lambda d, f: (_quantize(f, d, "--tau", "0"), "--tau 0.0: must be > 0"),
    "flag: --eval-every -1": lambda d, f: (_quantize(f, d, "--eval-every", "-1"), "--eval-every must be >= 0"),
    "flag: --group-size 3": lambda d, f: (_quantize(f, d, "--group-size", "3"), "group size 3 does not divide"),
    "flag: --scale-mode bogus": lambda d, f: (_quantize(f, d, "--scale-mode", "bogus"), "invalid choice: 'bogus'"),
    "flag: --dtype fp8": lambda d, f: (_quantize(f, d, "--dtype", "fp8"), "invalid choice: 'fp8'"),
    "flag: --seq-len 10^9": lambda d, f: (_quantize(f, d, "--seq-len", str(10 ** 9)), "smaller than one optimizer step"),
    "generate: --max-new-tokens 0": lambda d, f: (["generate", str(f / "packed"), "--prompt", "Hi", "--max-new-tokens",
                                                   "0"], "--max-new-tokens must be >= 1"),
    "generate: --temperature -1": lambda d, f: (["generate", str(f / "packed"), "--prompt", "Hi", "--temperature", "-1"],
                                                "--temperature must be >= 0"),
    "generate: --top-p 0": lambda d, f: (["generate", str(f / "packed"), "--prompt", "Hi", "--top-p", "0"],
                                         "--top-p in \\(0, 1\\]"),
    "generate: --top-p 2": lambda d, f: (["generate", str(f / "packed"), "--prompt", "Hi", "--top-p", "2"],
                                         "--top-p in \\(0, 1\\]"),
    "plan: --nproc 0": lambda d, f: (["plan", "--nproc", "0"], "--nproc must be >= 1"),
    "plan: --gpu z100": lambda d, f: (["plan", "--gpu", "z100"], "invalid choice: 'z100'"),
    "plan: --tokens 0": lambda d, f: (["plan", "--tokens", "0"], "--tokens must be >= 1"),
    "serve: --port 70000": lambda d, f: (["serve", str(f / "packed"), "--port", "70000"], "must be in 0..65535"),
    "serve: --max-batch 0": lambda d, f: (["serve", str(f / "packed"), "--max-batch", "0"], "must be in 1..64"),
    "serve: --max-batch 65": lambda d, f: (["serve", str(f / "packed"), "--max-batch", "65"], "must be in 1..64"),
    "serve: --max-queue 0": lambda d, f: (["serve", str(f / "packed"), "--max-queue", "0"], "must be in 1..65536"),
    "bench serve: --clients 0": lambda d, f: (["bench", "serve", "--clients", "0"], "each level must be in 1..64"),
    "bench serve: --clients 100": lambda d, f: (["bench", "serve", "--clients", "100"], "each level must be in 1..64"),
    "path: ppl --text missing": lambda d, f: (["ppl", str(f / "packed"), "--text", str(d / "none")],
                                              "no such file or folder"),
    "eval: unknown task": lambda d, f: (["eval", str(f / "packed"), "--tasks", "mmlu", "--data-dir", str(d)],
                                        "unknown task\\(s\\) mmlu"),
    "export: --format tq3": lambda d, f: (["export", str(f / "packed"), "--format", "tq3", "--out", str(d / "x")],
                                          "invalid choice: 'tq3'"),
    "push: repo id a/b/c": lambda d, f: (["push", str(f / "packed"), "a/b/c", "--dry-run"], "OWNER/NAME"),
    "device: meta": lambda d, f: (_quantize(f, d, "--device", "meta"), "commands run on the CPU or a CUDA GPU"),
    "device: mps": lambda d, f: (_quantize(f, d, "--device", "mps"), "commands run on the CPU or a CUDA GPU"),
    "os: --out under a file": lambda d, f: ((d / "afile").write_text("mine") and
                                            _quantize(f, d)[:-1] + [str(d / "afile" / "run")], "afile: exists and is not a folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_input_is_one_line_and_changes_nothing(name, files, tmp_path, capsys):
    argv, msg = CASES[name](tmp_path, files)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    n = torch.get_num_threads()
    try:
        rc = main(argv)
    except SystemExit as e:        # argparse's own usage errors (an invalid choice) exit 2, as CLIs do
        rc = e.code
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == (2 if "invalid choice" in msg else 1), (name, rc, err)
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
    import re
    assert re.search(msg, err[0]), err[0]
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p in before}
    assert after == before, "a failed command changed files that existed before"


def test_a_failed_start_leaves_no_run_folder(files, tmp_path, capsys, monkeypatch):
    """The run folder is made, then the run fails before its first step completes: the folder goes again."""
    monkeypatch.setenv("TERNARY_MAMBA_FAULT", "raise@0:0")
    assert main(["quantize", "--data", str(files / "text"), "--tokens", "4096", "--seq-len", "64", "--batch-size", "4",
                 "--eval-every", "0", "--out", str(tmp_path / "run")]) == 1
    assert "injected" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_env_switches_are_checked(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TERNARY_MAMBA_ALLOW_LARGE", "yes")
    (tmp_path / "big.json").write_text('{"d_model": 65536, "n_layer": 2, "vocab_size": 8192, "d_state": 64}')
    assert main(["plan", "--teacher", str(tmp_path / "big.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TERNARY_MAMBA_ALLOW_LARGE='yes': expected 0 or 1" in err[0], err


def test_an_unreadable_corpus_file_is_one_line(files, tmp_path, capsys):
    """EACCES (root reads everything, so this runs as a normal user only)."""
    import os
    if os.geteuid() == 0:
        pytest.skip("root bypasses file permissions")
    (tmp_path / "c").mkdir()
    f = tmp_path / "c" / "a.txt"
    f.write_text("Some text. " * 400)
    f.chmod(0)
    assert main(["quantize", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0], err
    assert not (tmp_path / "run").exists()


def test_step_with_a_wrong_state_is_refused():
    m = random_model(tiny_config())
    state = m.empty_state(2)
    state[0].ssm = torch.zeros(2, 3, 3, 3)
    with pytest.raises(ValueError, match="state shapes"), torch.no_grad():
        m.step(torch.tensor([1, 2]), state, inplace=True)
    with pytest.raises(ValueError, match="state shapes"), torch.no_grad():
        m(torch.tensor([[1, 2]]), state=m.empty_state(1)[:1] + state[1:])
