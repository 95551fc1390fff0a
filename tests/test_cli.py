"""The command line: instant help, info on presets/folders, one-line errors."""
import subprocess
import sys

from ternary_mamba.cli import main


def test_help_is_instant_and_does_not_import_torch():
    code = "import sys, ternary_mamba.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    # instant = nothing heavy is imported (checked above, and for the full CLI here), not a wall-clock bound
    code = "import sys, runpy; sys.argv = ['ternary-mamba', '--help']\ntry:\n    runpy.run_module('ternary_mamba', " \
           "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout and r.stdout.strip().endswith("False")


def test_info_on_the_1_3b_preset(capsys):
    assert main(["info", "mamba2-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "1,343,757,312" in out and "2,687.5 MB" in out


def test_info_on_a_folder_with_only_a_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"d_model": 768, "n_layer": 24, "vocab_size": 50277, '
                                          '"ssm_cfg": {"layer": "Mamba2"}, "pad_vocab_size_multiple": 16}')
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "in_proj" in out and "out_proj" in out and "FP16 size" in out


def test_info_on_a_saved_model(tiny_teacher_dir, capsys):
    assert main(["info", str(tiny_teacher_dir)]) == 0
    assert "d_model" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]


def test_bench_rejects_an_unknown_model_before_measuring(capsys):
    assert main(["bench", "decode", "--models", "no-such-model"]) == 1
    out = capsys.readouterr()
    assert "bandwidth" not in out.out                      # nothing was measured first
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "neither a preset" in err[0]


def test_a_resume_takes_the_recorded_thread_count(tmp_path):
    import json
    from ternary_mamba.cli import _recorded_threads
    from ternary_mamba.commands.configs import QuantizeConfig
    (tmp_path / "run.json").write_text(json.dumps({"command": "quantize", "config": {"threads": 3}}))
    assert _recorded_threads(QuantizeConfig(out=str(tmp_path), resume=True)) == 3
    assert _recorded_threads(QuantizeConfig(out=str(tmp_path), resume=False)) is None
    (tmp_path / "run.json").write_text('{"config": {"threads": true}}')
    assert _recorded_threads(QuantizeConfig(out=str(tmp_path), resume=True)) is None


def test_a_mistyped_flag_is_one_line_with_the_closest_flag(capsys):
    assert main(["quantize", "--tokenz", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ternary-mamba quantize: error: unrecognized argument --tokenz; did you mean --tokens?"]
    assert main(["bench", "decode", "--tokns", "3"]) == 2
    assert "did you mean --tokens?" in capsys.readouterr().err


def test_no_abbreviated_flags():
    """--token is neither --tokens nor --tokenizer: abbreviations would change meaning as flags are added."""
    import pytest
    with pytest.raises(SystemExit):
        from ternary_mamba.cli import build_parser
        build_parser().parse_args(["quantize", "--tok", "5"])


def test_conflicting_guard_flags_and_an_unknown_preset_are_one_line(capsys):
    assert main(["quantize", "--guard-band", "0.4", "1.6", "--guard-low", "0.3"]) == 1
    assert "drop --guard-low" in capsys.readouterr().err
    assert main(["plan", "--teacher", "mamba2-13b"]) == 1
    assert "did you mean mamba2-1.3b?" in capsys.readouterr().err


def test_environment_switches_are_checked_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("TERNARY_MAMBA_REFERENCE", "banana")
    assert main(["info", "mamba2-130m"]) == 1
    assert "TERNARY_MAMBA_REFERENCE='banana'" in capsys.readouterr().err
    monkeypatch.delenv("TERNARY_MAMBA_REFERENCE")
    monkeypatch.setenv("TERNARY_MAMBA_FAULT", "junk")
    assert main(["info", "mamba2-130m"]) == 1
    assert "TERNARY_MAMBA_FAULT='junk'" in capsys.readouterr().err
