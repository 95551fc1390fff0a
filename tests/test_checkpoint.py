"""Checkpoint formats (ours, mamba_ssm, transformers incl. sharded) and their strict error handling."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_model, tiny_config
from ternary_mamba.formats.folders import model_state_for_saving, save_model
from ternary_mamba.runtime.load import load_model
from ternary_mamba.errors import UserError


def _same(a, b):
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a(ids), b(ids), atol=1e-5)  # chunk size may differ: last-bit differences


def test_own_format_roundtrip_and_tied_weight_stored_once(tmp_path):
    m = random_model(tiny_config())
    save_model(m, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    assert _same(m, loaded)


def test_save_refuses_to_overwrite(tmp_path):
    m = random_model(tiny_config())
    save_model(m, tmp_path / "m")
    with pytest.raises(UserError, match="already exists"):
        save_model(m, tmp_path / "m")


def _mamba_ssm_folder(tmp_path, m, as_pickle=True):
    cfg = m.config
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.headdim, "ngroups": cfg.ngroups},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "tie_embeddings": True}))
    sd = {k: v.clone() for k, v in m.state_dict().items()}  # includes lm_head.weight, as mamba_ssm saves it
    if as_pickle:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        save_file(model_state_for_saving(m), str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("as_pickle", [True, False])
def test_mamba_ssm_folder(tmp_path, as_pickle):
    m = random_model(tiny_config(ngroups=2))
    loaded = load_model(_mamba_ssm_folder(tmp_path, m, as_pickle))
    assert _same(m, loaded)


def test_transformers_sharded_folder(tmp_path):
    m = random_model(tiny_config())
    cfg = m.config
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model_state_for_saving(m).items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mamba2", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "state_size": cfg.d_state, "head_dim": cfg.headdim, "n_groups": cfg.ngroups, "expand": 2,
        "conv_kernel": 4, "vocab_size": cfg.padded_vocab_size, "num_heads": cfg.nheads, "tie_word_embeddings": True}))
    assert _same(m, load_model(tmp_path))


def test_pickle_with_objects_is_refused(tmp_path):
    m = random_model(tiny_config())
    _mamba_ssm_folder(tmp_path, m)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only"):
        load_model(tmp_path)


def test_wrong_shape_missing_and_unknown_keys(tmp_path):
    m = random_model(tiny_config())
    save_model(m, tmp_path / "m")
    sd = model_state_for_saving(m)
    for label, bad in [("shape", {**sd, "backbone.norm_f.weight": torch.ones(3)}),
                       ("missing", {k: v for k, v in sd.items() if "A_log" not in k}),
                       ("unexpected", {**sd, "foo.weight": torch.ones(2)})]:
        save_file(bad, str(tmp_path / "m" / "model.safetensors"))
        with pytest.raises(UserError, match=label):
            load_model(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
    m = random_model(tiny_config())
    save_model(m, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path / "m")


def test_other_architecture_and_absurd_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserError, match="not Mamba-2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 10**6, "n_layer": 10**4, "vocab_size": 10, "d_state": 128}))
    with pytest.raises(UserError, match=r"config\.json: .*(beyond this toolkit.s limits|multiple)"):  # names the file
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": 10,
                                                      "ssm_cfg": {"layer": "Mamba1"}}))
    with pytest.raises(UserError, match="Mamba1"):
        load_model(tmp_path)


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="local folder"):
        load_model("state-spaces/mamba2-130m")  # HF_HUB_OFFLINE=1 in conftest


@pytest.mark.parametrize("damage", ["one-element moments", "empty state", "no groups", "not a dict", "empty step",
                                    "betas a string"])
def test_a_damaged_optimizer_state_is_refused_before_torch_sees_it(tmp_path, text_dir, damage):
    """A moment of the wrong shape reached the fused AdamW kernel and crashed the process (SIGSEGV); an empty
    state silently restarted the optimizer.  Both are one-line errors now, and the checkpoint stays as it was."""
    import subprocess
    import sys
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.cli import main
    cfg = tmp_path / "tiny.json"
    cfg.write_text('{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}')
    args = ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(text_dir),
            "--tokens", "2048", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0", "--save-every", "4",
            "--threads", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    opt = tmp_path / "run" / "checkpoint" / "optimizer.pt"
    osd = torch.load(opt, weights_only=True)
    if damage == "one-element moments":
        for st in osd["state"].values():
            st["exp_avg"] = torch.zeros(1)
    elif damage == "empty state":
        osd = {"state": {}, "param_groups": osd["param_groups"]}
    elif damage == "no groups":
        osd = {"state": {}, "param_groups": []}
    elif damage == "empty step":      # torch's float(step) of a 0-element tensor raised inside load_state_dict
        for st in osd["state"].values():
            st["step"] = torch.zeros(0)
    elif damage == "betas a string":  # torch adopts the saved group settings: AdamW would fail mid-step
        osd["param_groups"][0]["betas"] = "fast"
    else:
        osd = [1, 2, 3]
    torch.save(osd, opt)
    before = opt.read_bytes()
    r = subprocess.run([sys.executable, "-m", "ternary_mamba", *args, "--resume"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-800:])
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "optimizer.pt" in err[0], r.stderr[-800:]
    assert opt.read_bytes() == before
