"""Typed configs: the CLI's flags, config files (JSON / YAML / run.json) and the Python API are one thing."""
import json

import pytest

from ternary_mamba.cli import build_parser, main, typed_config
from ternary_mamba.commands.configs import ExportConfig, PretrainConfig, QuantizeConfig
from ternary_mamba.errors import UserError
from ternary_mamba.quant.config import SCALE_MODES, TernaryConfig
from ternary_mamba.train.config import TrainConfig


def _cfg(argv):
    return typed_config(build_parser().parse_args(argv))


def test_flags_map_onto_the_nested_config_and_defaults_come_from_the_dataclass():
    cfg = _cfg(["quantize", "--tokens", "20000", "--scale-mode", "guarded", "--guard-band", "0.6", "1.4",
                "--tau", "2", "--on-collapse", "stop"])
    assert isinstance(cfg, QuantizeConfig)
    assert cfg.train.tokens == 20000 and cfg.train.lr == QuantizeConfig().train.lr == 2e-3
    assert cfg.quant == TernaryConfig(scale_mode="guarded", guard_low=0.6, guard_high=1.4)
    assert cfg.distill.tau == 2.0 and cfg.monitor.on_collapse == "stop"
    assert _cfg(["quantize"]) == QuantizeConfig()          # no flags: exactly the dataclass defaults


def test_choices_and_help_come_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(SCALE_MODES) + "}" in out
    assert "250000" in out and "(default: None)" not in out and "teacher folder or hub id (default: the bundled" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--scale-mode", "nope"])


def test_config_files_json_and_yaml_with_flags_on_top(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"tokens": 30000, "seed": 3}, "quant": {"group_size": 64}}))
    (tmp_path / "c.yaml").write_text("train:\n  tokens: 30000\n  seed: 3\nquant:\n  group_size: 64\n")
    a = _cfg(["quantize", "--config", str(tmp_path / "c.json"), "--seed", "5"])
    b = _cfg(["quantize", "--config", str(tmp_path / "c.yaml"), "--seed", "5"])
    assert a == b and a.train.tokens == 30000 and a.train.seed == 5 and a.quant.group_size == 64


@pytest.mark.parametrize("content,msg", [
    ({"train": {"tokns": 1}}, "unknown field tokns"),
    ({"train": {"tokens": "many"}}, "tokens must be an integer"),
    ({"quant": {"scale_mode": "sideways"}}, "scale mode 'sideways' unknown"),
    ({"quant": 5}, "must be an object"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, msg):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    assert main(["quantize", "--config", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_round_trip_through_a_dict():
    cfg = QuantizeConfig(data=["a", "b"], quant=TernaryConfig(group_size=-1, targets=("in_proj",)),
                         train=TrainConfig(tokens=5000))
    assert QuantizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError):
        TrainConfig(save_every=0)


def test_pretrain_config_is_a_run_config_and_a_model_config_is_refused_in_one_line(tmp_path):
    f = tmp_path / "tiny.json"
    f.write_text('{"d_model": 32, "n_layer": 2, "chunk_size": 16}')
    cfg = _cfg(["pretrain", "--model-config", str(f), "--tokenizer", "t.json", "--data", "d", "--out", "o"])
    assert isinstance(cfg, PretrainConfig) and cfg.model == str(f)
    for wrong in (str(f), "teacher-8k"):
        with pytest.raises(UserError, match="model_config"):
            _cfg(["pretrain", "--config", wrong])
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"command": "pretrain", "config": {"model": "tiny", "train": {"tokens": 777}}}))
    assert _cfg(["pretrain", "--config", str(run)]).train.tokens == 777


def test_positional_and_required_fields():
    cfg = _cfg(["export", "runs/x", "--out", "p", "--format", "tq1"])
    assert cfg == ExportConfig(model="runs/x", out="p", format="tq1")


def _losses(run, n):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r][:n]


def test_run_json_replays_the_run(tiny_teacher_dir, text_dir, tmp_path):
    import torch
    threads = torch.get_num_threads()
    try:
        a = tmp_path / "a"
        assert main(["quantize", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--tokens", "2048",
                     "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--scale-mode", "learned",
                     "--eval-every", "0", "--final-eval-batches", "1", "--threads", "1", "--out", str(a)]) == 0
        record = json.loads((a / "run.json").read_text())
        assert record["command"] == "quantize" and record["config"]["quant"]["scale_mode"] == "learned"
        assert main(["quantize", "--config", str(a / "run.json"), "--out", str(tmp_path / "b")]) == 0
        yaml = tmp_path / "replay.yaml"
        import yaml as y
        yaml.write_text(y.safe_dump(record["config"]))
        assert main(["quantize", "--config", str(yaml), "--out", str(tmp_path / "c")]) == 0
    finally:
        torch.set_num_threads(threads)
    ref = _losses(a, 4)
    assert len(ref) == 4
    assert _losses(tmp_path / "b", 4) == ref and _losses(tmp_path / "c", 4) == ref
    b_cfg = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert {**b_cfg, "out": None} == {**record["config"], "out": None}


def test_every_recipe_is_a_valid_config():
    from pathlib import Path
    from ternary_mamba.commands.flags import read_config_file
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for r in recipes:
        cfg = QuantizeConfig.from_dict(read_config_file(r), str(r))
        assert cfg.train.tokens >= 250_000
    paper = QuantizeConfig.from_dict(read_config_file(recipes[-1]))
    assert paper.train.tokens == 102_000_000 and paper.dtype == "bf16" and paper.quant.scale_format == "bf16"
