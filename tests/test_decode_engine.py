"""The whole-model C decode step (decode_engine.py + csrc/lm_step.c) against the module-by-module step."""
import copy

import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.runtime import decode_engine
from ternary_mamba.bench.runtime import pack_in_place
from ternary_mamba.runtime.decode_engine import engine_for
from ternary_mamba.runtime.heads import use_fp16_head, use_int8_head
from ternary_mamba.ops.build import get_kernel
from ternary_mamba.ops.dispatch import reference_path
from ternary_mamba.runtime.packed_linear import use_a8_activations
from ternary_mamba.quant.qat import TernaryConfig, quantize_

pytestmark = pytest.mark.skipif(get_kernel() is None, reason="no C compiler")
TOKENS = torch.tensor([[3, 5, 100, 7, 0, 509, 42, 9]] * 3) + torch.arange(3)[:, None]


@torch.no_grad()
def decode(m, inplace: bool, state=None, engine: bool = True):
    """inplace: the runtime's step (the whole-model engine when it can run the model, else the module path with
    the fused mixer kernels; engine=False: the latter alone); otherwise Mamba2LM.step copying the state."""
    st = state if state is not None else m.empty_state(3)
    outs = []
    for t in range(TOKENS.size(1)):
        if inplace and engine:
            o, st = decode_engine.step(m, TOKENS[:, t], st)
        else:
            o, st = m.step(TOKENS[:, t], st, inplace=inplace)
        outs.append(o)
    return torch.stack(outs, 1), st


def assert_engine_matches_modules(m, atol=1e-5):
    got, st = decode(m, inplace=True)
    assert engine_for(m) is not None, "the engine should handle this model"
    ref, ref_st = decode(m, inplace=False)          # the PyTorch module path (the reference)
    assert (got - ref).abs().max() < atol
    for a, b in zip(st, ref_st):
        assert torch.allclose(a.conv, b.conv, atol=1e-6) and torch.allclose(a.ssm, b.ssm, atol=atol)


@pytest.mark.parametrize("kw", [{}, {"ngroups": 2, "conv_bias": False}, {"bias": True}])
def test_engine_matches_the_module_step_for_every_projection_kind(kw):
    m = random_model(tiny_config(d_model=128, headdim=32, **kw))
    if kw.get("bias"):
        with torch.no_grad():
            for layer in m.backbone.layers:
                layer.mixer.in_proj.bias.normal_()
                layer.mixer.out_proj.bias.normal_()
    assert_engine_matches_modules(m)                      # fp32 dense
    pack_in_place(m, 128)
    assert_engine_matches_modules(m)                      # packed ternary, exact fp32 products
    use_fp16_head(m)
    assert_engine_matches_modules(m)                      # + the fp16 head a packed folder stores
    use_int8_head(m)
    assert_engine_matches_modules(m)                      # + 8-bit head
    assert use_a8_activations(m) > 0
    assert_engine_matches_modules(m)                      # + int8 activations (same kernel on both paths)


def test_engine_notices_swapped_modules_and_prefill_states():
    m = random_model(tiny_config(d_model=128, headdim=32))
    ref = copy.deepcopy(m)
    first, _ = decode(m, inplace=True)
    use_int8_head(m)                                      # swapped after the engine was built
    second, _ = decode(m, inplace=True)
    assert not torch.equal(first, second)
    use_int8_head(ref)
    expect, _ = decode(ref, inplace=False)
    assert (second - expect).abs().max() < 1e-5
    # states from a chunked prefill (non-contiguous conv slice) continue exactly like the full forward
    with torch.no_grad():
        full = m(TOKENS)
        _, st = m(TOKENS[:, :5], return_state=True)
        out, _ = decode_engine.step(m, TOKENS[:, 5], st)
    assert (out - full[:, 5]).abs().max() < 1e-4


def test_engine_declines_what_it_cannot_run_and_checks_token_ids():
    m = random_model(tiny_config(d_model=128, headdim=32))
    q = copy.deepcopy(m)
    quantize_(q, TernaryConfig(group_size=128))           # fake-quant modules: the module path runs
    got, _ = decode(q, inplace=True)
    assert engine_for(q) is None
    ref, _ = decode(q, inplace=False)
    assert (got - ref).abs().max() < 1e-5
    seen = []
    h = m.backbone.layers[1].mixer.out_proj.register_forward_hook(lambda mod, i, o: seen.append(o))
    decode(m, inplace=True)                               # a hook must see its module run: module path
    h.remove()
    assert len(seen) == TOKENS.size(1)
    with pytest.raises(IndexError), torch.no_grad():
        decode_engine.step(m, torch.tensor([m.config.padded_vocab_size]), m.empty_state(1))


def test_engine_profile_accumulates_phases():
    m = random_model(tiny_config())
    decode(m, inplace=True)
    eng = engine_for(m)
    eng.profile = torch.zeros(5, dtype=torch.float64)
    decode(m, inplace=True)
    assert (eng.profile > 0).all() and len(eng.PHASES) == 5


def test_module_path_fused_mixer_still_matches():
    m = random_model(tiny_config(ngroups=2))
    got, _ = decode(m, inplace=True, engine=False)       # Mamba2LM.step: modules + the fused mixer kernel
    with reference_path():
        assert engine_for(m) is not None and decode_engine.fast_step(m, TOKENS[:, 0], m.empty_state(3)) is None
        ref, _ = decode(m, inplace=False)                 # the pure-PyTorch reference
    assert (got - ref).abs().max() < 1e-4


def test_fp16_head_equals_the_fp32_head_on_fp16_weights():
    from ternary_mamba.ops.kernels import f16_gemv
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 136, generator=g).half()
    x = torch.randn(3, 136, generator=g)
    w[0, :5] = torch.tensor([0.0, -0.0, 6e-8, -65504.0, 1e-5]).half()   # zeros, subnormal, extremes
    ref = x @ w.float().T
    assert torch.allclose(f16_gemv(w, x), ref, rtol=1e-5, atol=1e-3)
    m = random_model(tiny_config(d_model=128, headdim=32))
    with torch.no_grad():
        m.backbone.embedding.weight.copy_(m.backbone.embedding.weight.half().float())
    fp32_logits, _ = decode(m, inplace=False)
    use_fp16_head(m)
    got, _ = decode(m, inplace=True)
    assert (got - fp32_logits).abs().max() < 1e-5


def test_packed_folder_decodes_through_the_engine_with_its_fp16_head(tmp_path):
    from ternary_mamba.runtime.load import load_model
    from ternary_mamba.runtime.heads import Fp16Head
    from ternary_mamba.formats.packed import export_packed
    m = random_model(tiny_config(d_model=128, headdim=32))
    quantize_(m, TernaryConfig(group_size=64))
    export_packed(m, tmp_path / "p", "tq1", "fp16")
    p = load_model(tmp_path / "p")
    assert isinstance(p.lm_head, Fp16Head)
    with torch.no_grad():
        full = p(TOKENS)
    got, _ = decode(p, inplace=True)
    assert engine_for(p) is not None
    assert (got - full).abs().max() < 1e-4


def test_session_decodes_like_model_step_and_generate_uses_it():
    from ternary_mamba.runtime.decode_engine import session
    from ternary_mamba.runtime.generate import generate_ids
    m = random_model(tiny_config(d_model=128, headdim=32))
    pack_in_place(m, 128)
    ref, _ = decode(m, inplace=False)
    with torch.no_grad():
        _, st = m(TOKENS[:, :1], return_state=True)       # prefill state (non-contiguous conv slice)
        sess = session(m, st, nb=3)
        assert sess is not None
        outs = [sess.step(TOKENS[:, t].tolist()) for t in range(1, TOKENS.size(1))]
    assert (torch.stack(outs, 1) - ref[:, 1:]).abs().max() < 1e-4
    with pytest.raises(IndexError):
        sess.step([0, 1, m.config.padded_vocab_size])
    prompt = TOKENS[0, :4].tolist()
    fast = list(generate_ids(m, prompt, 12, temperature=0))
    with reference_path():
        slow = list(generate_ids(m, prompt, 12, temperature=0))
    assert fast == slow


@pytest.mark.parametrize("out_f,in_f", [(37, 64), (64, 48), (5, 40)])
@pytest.mark.parametrize("nb", [1, 3, 4, 5, 9])
def test_f32_gemv_matches_linear_for_any_number_of_tokens(out_f, in_f, nb):
    """Blocks of four rows and four tokens, their ragged edges, and the fallback for in % 16 != 0."""
    from ternary_mamba.ops.build import get_kernel
    lib = get_kernel()
    gen = torch.Generator().manual_seed(nb)
    w, x = torch.randn(out_f, in_f, generator=gen), torch.randn(nb, in_f, generator=gen)
    y = torch.full((nb, out_f), float("nan"))
    lib.f32_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), out_f, in_f, nb)
    assert torch.allclose(y, x @ w.T, atol=1e-5)


def _greedy_vs_full(m, steps=12, nb=3):
    """step_greedy and argmax(step) from identical states, token for token."""
    vocab = m.config.vocab_size
    s1 = decode_engine.session(m, m.empty_state(nb), nb)
    s2 = decode_engine.session(m, m.empty_state(nb), nb)
    toks = [1 + b for b in range(nb)]
    for _ in range(steps):
        full = s1.step(toks)[:, :vocab].argmax(-1).tolist()
        greedy = s2.step_greedy(toks, vocab)
        assert greedy == full
        toks = full
    return s2.engine.rescored / (steps * nb)


@pytest.mark.parametrize("head", ["fp32", "fp16"])
def test_greedy_step_gives_exactly_the_argmax_of_the_full_logits(head):
    m = random_model(tiny_config(vocab_size=600))
    if head == "fp16":
        with torch.no_grad():
            m.backbone.embedding.weight.copy_(m.backbone.embedding.weight.half().float())
        use_fp16_head(m)
    per_token = _greedy_vs_full(m)
    assert per_token < 0.2 * m.config.padded_vocab_size   # the pre-pass leaves only a few rows to rescore


def test_greedy_step_is_exact_on_ties_and_near_ties():
    """A cluster of head rows closer to one another than the int8 rounding error, so the approximate logits order
    them wrongly and the exact rescoring must decide; plus exact copies (ties: the first index wins, as in
    argmax).  The hidden state is steered towards the cluster so the maximum is inside it."""
    m = random_model(tiny_config(vocab_size=300))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = m.backbone.embedding.weight
        base = w[10] * 20
        step = base.abs().max() / 127                                   # the int8 rounding step of these rows
        w[100:200] = base + 0.3 * step * torch.randn(100, w.size(1), generator=gen)
        w[250:260] = w[150]
        m.backbone.norm_f.weight.copy_(torch.sign(base) * 3)           # hidden states lean towards the cluster
    s_greedy = decode_engine.session(m, m.empty_state(1), 1)
    s_full = decode_engine.session(m, m.empty_state(1), 1)
    tok, in_cluster = [1], 0
    for _ in range(30):
        full = s_full.step(tok)[:, :300].argmax(-1).tolist()
        assert s_greedy.step_greedy(tok, 300) == full
        in_cluster += 100 <= full[0] < 200
        tok = full
    assert in_cluster > 5, "the maximum should fall inside the cluster"


def test_greedy_generate_matches_the_module_path_token_for_token(monkeypatch):
    from ternary_mamba.runtime.generate import generate_ids
    m = random_model(tiny_config(vocab_size=500))
    fast = list(generate_ids(m, [5, 6, 7], 30, temperature=0))
    monkeypatch.setattr(decode_engine, "session", lambda *a, **k: None)    # no engine: Mamba2LM.step
    monkeypatch.setattr("ternary_mamba.runtime.generate.session", lambda *a, **k: None)
    assert list(generate_ids(m, [5, 6, 7], 30, temperature=0)) == fast


def test_the_engine_cache_does_not_keep_the_model_alive():
    import gc
    import weakref
    m = random_model(tiny_config(vocab_size=500))
    sess = decode_engine.session(m, m.empty_state(1))
    sess.step_greedy([1], 500)
    ref = weakref.ref(m)
    del m, sess
    gc.collect()
    assert ref() is None
