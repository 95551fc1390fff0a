"""Shared fixtures: tiny configs and models made on the fly, and the tokenizer shipped with the package.
Nothing here reads ../shared or the network."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# With a C compiler present, a kernel that fails to build is a failure, not a skip ("no C compiler")
if shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc"):
    os.environ.setdefault("TERNARY_MAMBA_REQUIRE_KERNELS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from ternary_mamba.assets import ASSETS  # noqa: E402
from ternary_mamba.core.config import Mamba2Config  # noqa: E402

BUNDLED_TOKENIZER = ASSETS / "gutenberg-bpe-8k.json"


def tiny_config(**kw) -> Mamba2Config:
    base = dict(d_model=64, n_layer=2, d_state=16, headdim=16, vocab_size=512, chunk_size=16)
    base.update(kw)
    return Mamba2Config(**base)


def random_tq2(out_f: int, in_f: int, G: int, g: torch.Generator):
    """Random ternary codes in the packed tq2 layout (out_f, in_f / 4) and fp32 group scales in [0.1, 1.1),
    drawn from `g` (codes first, then scales), for the kernel tests."""
    from ternary_mamba.ops.packing import pack
    t = torch.randint(-1, 2, (out_f, in_f), generator=g, dtype=torch.int8)
    return pack(t, "tq2").reshape(out_f, in_f // 4), torch.rand(out_f, in_f // G, generator=g) + 0.1


def fake_quant_weights(out_f: int = 24, in_f: int = 256, G: int = 64, seed: int = 0):
    """Weights and per-group scales for the fake-quant kernel tests, with the edge cases in them: an all-zero
    group (the scale's lower clamp) and a weight exactly at s/2 (rounds to 0, to even)."""
    from ternary_mamba.quant.ternary import absmean_scale
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0, :G] = 0.0
    s = absmean_scale(w, G) * (1 + 0.3 * torch.rand(out_f, in_f // G, generator=g))
    w[1, 0] = 0.5 * s[1, 0].half().float()
    return w, s


def random_model(cfg: Mamba2Config, seed: int = 0):
    """A model with every parameter perturbed (norm weights, A_log, D, dt_bias too), so parity tests
    exercise all of them rather than their default values."""
    from ternary_mamba.core.model import Mamba2LM
    torch.manual_seed(seed)
    m = Mamba2LM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random Mamba-2 folder in the project's format, with the bundled 8k tokenizer."""
    from ternary_mamba.formats.folders import save_model
    d = tmp_path_factory.mktemp("teacher") / "tiny"
    save_model(random_model(tiny_config(vocab_size=8192, d_model=64)), d, tokenizer_path=BUNDLED_TOKENIZER)
    return d


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A small folder of text: an excerpt of the bundled books (~120 k characters)."""
    d = tmp_path_factory.mktemp("text")
    src = sorted((ASSETS / "books" / "train").glob("*.txt"))[:2]
    for f in src:
        (d / f.name).write_text(f.read_text()[:60_000])
    return d
