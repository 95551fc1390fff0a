"""The Python API: the README's example runs as written; convert_ keeps the fake-quant logits exactly;
load_model takes run folders; the one dispatch keeps non-CPU tensors away from C."""
import re
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.ops.dispatch import kernels_for, reference_kind, reference_path
from ternary_mamba.quant.qat import TernaryConfig, quantize_
from ternary_mamba.runtime.convert import convert_
from ternary_mamba.runtime.packed_linear import PackedTernaryLinear

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "Once upon a time" in out and "fast path vs reference" in out
    (run,) = [p for p in (tmp_path / "runs").glob("api-demo-*") if not p.name.endswith("-tq1")]
    assert (run / "student").is_dir() and run.with_name(run.name + "-tq1").is_dir()


@pytest.mark.parametrize("group,mode", [(32, "learned"), (-1, "absmean"), (64, "guarded")])
def test_convert_keeps_the_fake_quant_logits_exactly(group, mode):
    m = random_model(tiny_config(d_model=64, headdim=16), seed=1)
    quantize_(m, TernaryConfig(group_size=group, scale_mode=mode))
    with torch.no_grad():
        for p in m.parameters():   # move the scales off their initial absmean so `learned` differs
            if p.dim() == 2 and p.size(1) <= 4:
                p.mul_(1.1)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.eval()(ids)
        convert_(m)
        got = m(ids)
    assert all(type(l.mixer.in_proj) is PackedTernaryLinear for l in m.backbone.layers)
    resolved = {"in_proj": 64, "out_proj": 128} if group == -1 else group    # recorded resolved (d_model, d_inner)
    assert m.ternary_config is None and m.converted_from.group_size == resolved
    assert torch.equal(got, ref)


def test_load_model_accepts_run_folders(tmp_path):
    from ternary_mamba import load_model
    from ternary_mamba.errors import UserError
    from ternary_mamba.formats.folders import save_model
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="run folder without a finished model"):
        load_model(run)
    save_model(random_model(tiny_config()), run / "model")
    assert load_model(run).config.d_model == 64


def test_one_reference_switch_and_the_environment_maps_into_it(monkeypatch):
    assert reference_kind() is None
    with reference_path():
        assert reference_kind() == "torch" and not kernels_for(torch.zeros(2))
        with reference_path("sequential"):
            assert reference_kind() == "sequential"
        assert reference_kind() == "torch"
    assert reference_kind() is None
    monkeypatch.setenv("TERNARY_MAMBA_REFERENCE", "1")
    assert reference_kind() == "torch"
    with pytest.raises(ValueError):
        with reference_path("fast"):
            pass


def test_kernels_never_see_tensors_they_were_not_written_for():
    x = torch.zeros(4, 8)
    assert not kernels_for(x.to(torch.bfloat16)) and not kernels_for(torch.zeros(4, 8, device="meta"))
    assert kernels_for(x.to(torch.bfloat16), dtype=None) == kernels_for(x)
    from ternary_mamba.ops.kernels import tq2_gemv
    with pytest.raises(TypeError, match="only CPU tensors"):
        tq2_gemv(torch.zeros(4, 2, dtype=torch.uint8, device="meta"), torch.zeros(4, 1), torch.zeros(1, 8), 8)


def test_a_model_on_the_meta_device_runs_without_reaching_c():
    """The meta device raises on any mix with CPU tensors: a forward + backward on it proves every kernel
    dispatch sends non-CPU tensors to the PyTorch path."""
    from ternary_mamba.core.model import Mamba2LM
    with torch.device("meta"):
        m = Mamba2LM(tiny_config(), init=False)
        quantize_(m, TernaryConfig(group_size=32))
        ids = torch.zeros(2, 40, dtype=torch.long)
    loss = m(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert loss.device.type == "meta"
    with torch.no_grad():
        logits, state = m(ids, return_state=True)
        out, _ = m.step(ids[:, 0], state, inplace=True)
    assert out.device.type == "meta"


def test_threads_reach_the_c_kernels():
    """The kernels run on their own OpenMP runtime: --threads must set it too, not only torch's pool."""
    from ternary_mamba.ops.build import get_kernel, kernel_threads, set_threads
    if get_kernel() is None:
        pytest.skip("no C compiler")
    n = torch.get_num_threads()
    try:
        set_threads(1)
        assert kernel_threads() == 1 and torch.get_num_threads() == 1
    finally:
        set_threads(n)
    assert kernel_threads() == n


def test_the_api_loads_a_gguf_tokenizer_and_saves_models(tmp_path):
    pytest.importorskip("gguf")
    import ternary_mamba as tm
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.formats.gguf import export_gguf
    m = random_model(tiny_config(d_model=256, headdim=32, vocab_size=8192), seed=0)
    tm.quantize_(m, tm.TernaryConfig(group_size=256))
    export_gguf(m, tmp_path / "m.gguf", "tq2_0", BUNDLED_TOKENIZER)
    tok = tm.load_tokenizer(tmp_path / "m.gguf")
    assert tok.encode("Once upon a time") == tm.load_tokenizer(BUNDLED_TOKENIZER).encode("Once upon a time")
    out = tm.save_model(m, tmp_path / "saved")
    assert tm.load_model(out).ternary_config.group_size == 256


def test_the_api_says_what_it_does_through_a_logger_that_can_be_silenced(tmp_path, capsys):
    import logging
    import ternary_mamba as tm
    from ternary_mamba.commands.configs import ExportConfig
    out = tm.export(ExportConfig(model="bundled", format="tq2", out=str(tmp_path / "a")))
    assert "wrote" in capsys.readouterr().out and out.exists()
    with tm.quiet():
        tm.export(ExportConfig(model="bundled", format="tq2", out=str(tmp_path / "b")))
    assert capsys.readouterr().out == ""
    logging.getLogger("ternary_mamba").setLevel(logging.WARNING)
    try:
        tm.export(ExportConfig(model="bundled", format="tq2", out=str(tmp_path / "c")))
        assert capsys.readouterr().out == ""
    finally:
        logging.getLogger("ternary_mamba").setLevel(logging.INFO)


def test_errors_name_flags_on_the_command_line_and_arguments_in_python(tmp_path, capsys):
    """The same refusal: `--resume` / `--out` for a CLI user, `resume` / `out` for a Python caller."""
    from ternary_mamba.cli import main
    from ternary_mamba.errors import UserError, as_argument
    assert as_argument("pass --resume or another --out; --max-new-tokens 3; a-b --x") == \
        "pass resume or another out; max_new_tokens 3; a-b x"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert main(["quantize", "--out", str(tmp_path / "run"), "--tokens", "4096"]) == 1
    assert "pass --resume to continue it or choose another --out" in capsys.readouterr().err
    from ternary_mamba import QuantizeConfig, quantize
    with pytest.raises(UserError, match="pass resume to continue it or choose another out"):
        quantize(QuantizeConfig(out=str(tmp_path / "run")))
