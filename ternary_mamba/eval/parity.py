"""`ternary-mamba parity`: how closely our Mamba2LM reproduces transformers' Mamba2ForCausalLM.

transformers builds a model with random weights and saves it; we load that folder with our own loader and
compare logits (fp32, max abs difference): the chunked forward, token-by-token `step()` decoding, a prefill
followed by steps, and the sequential-recurrence reference.  Needs `transformers` (the test extra)."""
from __future__ import annotations

import tempfile

import torch

from ..errors import UserError
from ..ops.device import autocast, precision
from ..ops.dispatch import reference_path


def _hf_random_model(ngroups: int, folder, d_model: int, n_layer: int, chunk: int, vocab: int):
    import transformers
    from transformers import Mamba2Config, Mamba2ForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(ngroups)
    headdim = 32
    hc = Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layer, state_size=64, head_dim=headdim,
                      n_groups=ngroups, expand=2, num_heads=2 * d_model // headdim, vocab_size=vocab,
                      chunk_size=chunk, tie_word_embeddings=True, initializer_range=0.1)
    hf = Mamba2ForCausalLM(hc).eval()
    with torch.no_grad():   # move the 1-D parameters (norms, A, D, dt bias) away from their constant inits
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@torch.no_grad()
def parity_report(log, d_model: int = 128, n_layer: int = 2, seqlen: int = 100, chunk: int = 32,
                  vocab: int = 1024, device: str | None = "cpu", dtype: str = "fp32") -> dict:
    """Max abs logit differences for ngroups 1 and 2 at a length that is not a multiple of the chunk.  Both
    models run on `device` under `dtype` autocast (fp32: the exactness check; 16-bit: how far A16 moves them)."""
    dev, dt = precision(device, dtype)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("parity needs transformers (pip install '.[test]')") from None
    from ..runtime.load import load_model
    out = {}
    for ngroups in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            hf = _hf_random_model(ngroups, tmp, d_model, n_layer, chunk, vocab).to(dev)
            ours = load_model(tmp).eval().to(dev)
        ids = torch.randint(0, vocab, (2, seqlen), generator=torch.Generator().manual_seed(0)).to(dev)
        with autocast(dev, dt):
            r = _compare(ours, hf, ids, vocab, seqlen)
        out[f"ngroups_{ngroups}"] = r
        log(f"ngroups {ngroups} (d_model {d_model}, {n_layer} layers, {seqlen} tokens, chunk {chunk}, {dev}, {dtype}; "
            f"|logits| <= {r['max_abs_logit']:.2f}): forward vs transformers {r['forward_vs_transformers']:.2e}, "
            f"step decode vs transformers {r['step_vs_transformers']:.2e}, prefill {seqlen // 3} + steps vs forward "
            f"{r['prefill_then_step_vs_forward']:.2e}, sequential reference vs chunked {r['sequential_vs_chunked']:.2e}"
            "  (max abs)")
    return out


def _compare(ours, hf, ids, vocab: int, seqlen: int) -> dict:
    """Max abs differences: our forward and step decode vs transformers, prefill + steps vs forward, the
    sequential reference vs the chunked scan."""
    ref = hf(ids).logits.float()
    full = ours(ids)[..., :vocab].float()
    state, step_err = ours.empty_state(2), 0.0
    for t in range(seqlen):
        logits, state = ours.step(ids[:, t], state)
        step_err = max(step_err, (logits[..., :vocab] - ref[:, t]).abs().max().item())
    cut = seqlen // 3
    logits, state = ours(ids[:, :cut], return_state=True)
    prefill_err = (logits[..., :vocab] - full[:, :cut]).abs().max().item()
    for t in range(cut, seqlen):
        logits, state = ours.step(ids[:, t], state)
        prefill_err = max(prefill_err, (logits[..., :vocab] - full[:, t]).abs().max().item())
    with reference_path("sequential"):
        seq_err = (ours(ids)[..., :vocab] - full).abs().max().item()
    return {"forward_vs_transformers": (full - ref).abs().max().item(), "step_vs_transformers": step_err,
            "prefill_then_step_vs_forward": prefill_err, "sequential_vs_chunked": seq_err,
            "max_abs_logit": ref.abs().max().item()}
