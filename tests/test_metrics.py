"""The one held-out metric (runtime.metrics): per-window sums against torch's own functions, ignored targets not
scored, the teacher evaluated once when its logits are cached."""
import math

import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from ternary_mamba.runtime.metrics import IGNORE, heldout_windows, summarize, window_sums


def test_window_sums_equal_torch_functions_and_skip_ignored_targets():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)
    y = torch.randint(0, 50, (3, 7), generator=g)
    y[1, 4:] = IGNORE
    w = window_sums(s, y, t)
    m = y != IGNORE
    for i in range(3):
        mi = m[i]
        assert w["tokens"][i] == int(mi.sum())
        assert math.isclose(w["ce"][i], F.cross_entropy(s[i][mi], y[i][mi], reduction="sum").item(), rel_tol=1e-5)
        kl = F.kl_div(F.log_softmax(s[i][mi], -1), F.log_softmax(t[i][mi], -1), log_target=True, reduction="sum")
        assert math.isclose(w["kl"][i], kl.item(), rel_tol=1e-4, abs_tol=1e-6)
        assert w["agree"][i] == int((s[i][mi].argmax(-1) == t[i][mi].argmax(-1)).sum())
    out = summarize(w)
    assert math.isclose(out["loss"], sum(w["ce"]) / sum(w["tokens"])) and math.isclose(out["ppl"], math.exp(out["loss"]))


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    m = random_model(tiny_config(), seed=3).eval()
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    cache: list = []
    w = heldout_windows(m, [(x[:, :-1], x[:, 1:])], teacher=m, teacher_logits=cache)
    assert len(cache) == 1 and max(w["kl"]) < 1e-5 and w["agree"] == w["tokens"]
    again = heldout_windows(m, [(x[:, :-1], x[:, 1:])], teacher=None, teacher_logits=cache)   # reused, not re-run
    assert again["kl"] == w["kl"]
