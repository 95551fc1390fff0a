"""The shipped benchmarks' helpers (the timed runs themselves are not tests)."""
import pytest
import torch

from ternary_mamba.bench.model import profile_training
from ternary_mamba.ops.build import get_kernel


def test_training_profile_accounts_for_the_whole_step():
    torch.manual_seed(0)
    lines = []
    shares = profile_training(lines.append, steps=1, chunk=16, preset="tiny", batch=2, seq=32)
    assert abs(sum(shares.values()) - 1) < 1e-6 and min(shares.values()) >= 0
    assert shares["GEMMs (projections, lm_head; fwd+bwd)"] > 0
    if get_kernel() is not None:      # the C training kernels ran and were found by name
        assert shares["SSD scan, C (fwd+bwd)"] > 0 and shares["cross-entropy, C (fwd+bwd)"] > 0
    assert len(lines) == 1 + len(shares)
