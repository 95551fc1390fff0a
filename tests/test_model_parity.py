"""Our Mamba2LM against transformers' Mamba2ForCausalLM on the same random weights, and decoding
(prefill + step) against the full forward."""
import pytest
import torch

from ternary_mamba.ops.dispatch import reference_path

from conftest import random_model, tiny_config
from ternary_mamba.runtime.load import load_model

transformers = pytest.importorskip("transformers")


def _hf_model(ngroups: int, tmp_path):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    transformers.logging.set_verbosity_error()
    torch.manual_seed(ngroups)
    hc = Mamba2Config(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, n_groups=ngroups, expand=2,
                      num_heads=8, vocab_size=512, chunk_size=16, tie_word_embeddings=True, initializer_range=0.1)
    hf = Mamba2ForCausalLM(hc).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("seqlen", [37, 64])
def test_logits_match_transformers(ngroups, seqlen, tmp_path):
    hf = _hf_model(ngroups, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 512, (2, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)[..., :ref.size(-1)]
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ngroups", [1, 2])
def test_prefill_then_step_reproduces_forward(ngroups):
    model = random_model(tiny_config(ngroups=ngroups, chunk_size=8))
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        logits, state = model(ids[:, :13], return_state=True)
        assert torch.allclose(logits, full[:, :13], atol=1e-5)
        for t in range(13, 29):
            step_logits, state = model.step(ids[:, t], state)
            assert (step_logits - full[:, t]).abs().max().item() <= 1e-4


def test_step_from_empty_state_equals_forward():
    model = random_model(tiny_config())
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        state = model.empty_state(1)
        for t in range(10):
            out, state = model.step(ids[:, t], state)
            assert (out - full[:, t]).abs().max().item() <= 1e-4


def test_sequential_reference_matches_chunked_model():
    model = random_model(tiny_config(ngroups=2))
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = model(ids)
        with reference_path("sequential"):
            slow = model(ids)
    assert (fast - slow).abs().max().item() <= 1e-4


def test_the_parity_command_reports_small_differences(capsys):
    from ternary_mamba.cli import main
    assert main(["parity", "--seq-len", "40"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ngroups")]
    assert len(lines) == 2
    from ternary_mamba.eval.parity import parity_report
    for r in parity_report(lambda _: None, seqlen=20).values():
        assert max(v for k, v in r.items() if k != "max_abs_logit") <= 1e-4 < r["max_abs_logit"]


def test_a_model_built_to_be_loaded_skips_the_default_inits():
    """Mamba2LM(cfg, init=False) on the meta device (how every loader builds its model) must not run torch's
    default embedding init: on meta that goes through torch's Python refs and imports torch._dynamo, ~1.7 s of every
    `generate` / `serve` start.  In a fresh interpreter, so that nothing else imported it first."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "if 'torch._dynamo' in sys.modules: print('skip'); sys.exit()\n"
            "from ternary_mamba.core.config import Mamba2Config\n"
            "from ternary_mamba.core.model import Mamba2LM\n"
            "with torch.device('meta'):\n"
            "    m = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=512), init=False)\n"
            "assert m.backbone.embedding.weight.is_meta\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "skip":
        pytest.skip("this torch imports torch._dynamo at import time")
    assert out.stdout.strip() == "clean"
