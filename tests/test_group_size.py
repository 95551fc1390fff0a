"""`--group-size` from the user's value to the packed header: resolved once (quantize_ -> spec.resolve_group_size),
stored resolved, and the per-row student (-1) exports with the bits per weight its groups really take."""
import json

import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.commands.configs import ExportConfig
from ternary_mamba.commands.export import export
from ternary_mamba.errors import UserError
from ternary_mamba.formats.folders import save_model
from ternary_mamba.runtime.load import load_model
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules


def test_per_row_groups_are_resolved_once_and_stored_resolved(tmp_path):
    cfg = tiny_config()                                  # in_proj in = d_model 64, out_proj in = d_inner 128
    m = quantize_(random_model(cfg), TernaryConfig(group_size=-1))
    assert m.ternary_config.group_size == {"in_proj": cfg.d_model, "out_proj": cfg.d_inner}
    assert {mod.group_size for n, mod in ternary_modules(m) if n.endswith("in_proj")} == {cfg.d_model}
    save_model(m, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "config.json").read_text())["quantization"]["group_size"]
    assert saved == {"in_proj": 64, "out_proj": 128}     # never the unresolved -1
    again = load_model(tmp_path / "s")
    assert {n: mod.group_size for n, mod in ternary_modules(again)} == {n: mod.group_size for n, mod in ternary_modules(m)}


def test_uniform_groups_stay_one_int():
    m = quantize_(random_model(tiny_config()), TernaryConfig(group_size=32))
    assert m.ternary_config.group_size == 32


def test_per_row_student_exports_with_its_real_bits_per_weight(tmp_path, capsys):
    cfg = tiny_config()
    m = quantize_(random_model(cfg), TernaryConfig(group_size=-1))
    save_model(m, tmp_path / "s")
    export(ExportConfig(model=str(tmp_path / "s"), out=str(tmp_path / "p"), format="tq2"))
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tq2 (2-bit, tied)"))
    bits = float(row.split()[-1])
    # independently: 2 bits per code + one fp16 scale per row of each projection, weighted by its weights
    n_in, n_out = cfg.d_in_proj * cfg.d_model, cfg.d_model * cfg.d_inner
    want = 2 + (16 * cfg.d_in_proj + 16 * cfg.d_model) / (n_in + n_out)
    assert bits == pytest.approx(want, abs=1e-3) and bits > 0
    header = json.loads((tmp_path / "p" / "config.json").read_text())
    assert {v["group_size"] for k, v in header["ternary"].items() if "in_proj" in k} == {cfg.d_model}


def test_a_resolved_dict_must_name_the_projection():
    with pytest.raises(UserError, match="no group size recorded"):
        TernaryConfig(group_size={"in_proj": 64}).group_for("out_proj")
    with pytest.raises(UserError):
        TernaryConfig(group_size={"in_proj": 0})


@pytest.mark.parametrize("dtype, fmt", [("bf16", "bf16"), ("fp32", "fp16")])
def test_a_ternary_pretrain_run_in_progress_reloads_with_its_scale_format(text_dir, tmp_path, dtype, fmt):
    import shutil
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.cli import main
    cfg = tmp_path / "tiny.json"
    cfg.write_text('{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}')
    out = tmp_path / "run"
    assert main(["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data",
                 str(text_dir), "--ternary", "--scale-mode", "learned", "--group-size", "-1", "--dtype", dtype,
                 "--tokens", "1024", "--seq-len", "32", "--batch-size", "4", "--out", str(out), "--eval-every", "0",
                 "--threads", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["quant"]["scale_format"] == fmt
    finished = load_model(out / "model")
    shutil.rmtree(out / "model")                 # what is left is a run in progress: run.json + its checkpoint
    m = load_model(out)
    assert m.ternary_config.scale_format == fmt
    assert m.ternary_config.group_size == {"in_proj": 32, "out_proj": 64}
    for (n, a), (_, b) in zip(ternary_modules(m), ternary_modules(finished)):
        assert a.scale_format == fmt and torch.equal(a.effective_scale(), b.effective_scale()), n
