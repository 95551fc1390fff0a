"""Tokenizer loading/training and the data pipeline."""
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED_TOKENIZER
from ternary_mamba.errors import UserError
from ternary_mamba.formats.tokenizer import load_tokenizer, train_bpe_tokenizer
from ternary_mamba.train.data import PackedSequences, batch_indices, load_tokens, split_heldout, tokenize_to_file

NEOX = Path(__file__).resolve().parents[2] / "shared/data/tokenizers/gpt-neox-20b/20B_tokenizer.json"


def test_bundled_tokenizer_roundtrip():
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    text = "“Curiouser and curiouser!” cried Alice (she was so much surprised).\n\tTabs & ünïcödé 123."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 8192 and tok.eos_id == 0


@pytest.mark.skipif(not NEOX.exists(), reason="../shared not present (fresh clone)")
def test_gpt_neox_tokenizer_roundtrip():
    tok = load_tokenizer(NEOX)
    text = "Mamba-2 uses the GPT-NeoX tokenizer: 50277 ids.\n  indented"
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size >= 50277


def test_train_tokenizer(text_dir, tmp_path):
    tok = train_bpe_tokenizer(sorted(text_dir.glob("*.txt")), 400, tmp_path / "t.json")
    assert 300 <= tok.vocab_size <= 400
    assert tok.decode(tok.encode("Alice was beginning")) == "Alice was beginning"


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizers JSON"):
        load_tokenizer(tmp_path / "t.json")


def test_token_file_is_cached_and_jsonl_is_read(text_dir, tmp_path):
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    a = tokenize_to_file([j], tok, tmp_path / "cache", verbose=False)
    b = tokenize_to_file([j], tok, tmp_path / "cache", verbose=False)
    assert a == b
    ids = load_tokens(a).tolist()
    assert ids == tok.encode("hello world") + [0] + tok.encode("second doc") + [0]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        tokenize_to_file([tmp_path / "bad.jsonl"], tok, tmp_path / "cache", verbose=False)


def test_batches_are_deterministic_and_cover_an_epoch():
    a = batch_indices(100, 8, step=3, seed=1)
    assert np.array_equal(a, batch_indices(100, 8, step=3, seed=1))
    epoch = np.concatenate([batch_indices(96, 8, s, seed=0) for s in range(12)])
    assert sorted(epoch.tolist()) == list(range(96))
    r0 = batch_indices(96, 4, 5, seed=0, rank=0, world=2)
    r1 = batch_indices(96, 4, 5, seed=0, rank=1, world=2)
    assert np.array_equal(np.concatenate([r0, r1]), batch_indices(96, 8, 5, seed=0))


def test_heldout_split_is_disjoint():
    tokens = np.arange(1001, dtype=np.uint16)
    train, held = split_heldout(tokens, 10, 0.1)
    assert len(train) == 90 and len(held) == 10
    assert train.window(len(train) - 1)[-1] == held.window(0)[0]  # adjacent, not overlapping inputs
    with pytest.raises(UserError, match="less than one sequence"):
        PackedSequences(np.arange(5, dtype=np.uint16), 10)


def test_a_steps_windows_depend_on_the_global_batch_alone():
    """16 windows per step, shared out as 1 x 16, 2 ranks x 8, 1 rank x 2 micro-batches x 8, 2 x 2 x 4: the same
    windows every step, across epoch boundaries too (what a resume at another world size relies on)."""
    def step_windows(step, B, world, accum):
        return sorted(int(i) for r in range(world) for m in range(accum)
                      for i in batch_indices(100, B, step, seed=3, rank=r, world=world, accum=accum, micro=m))
    for step in (0, 5, 6, 13):                      # 100 // 16 = 6 steps an epoch
        ref = step_windows(step, 16, 1, 1)
        assert len(set(ref)) == 16
        for B, world, accum in ((8, 2, 1), (8, 1, 2), (4, 2, 2)):
            assert step_windows(step, B, world, accum) == ref, (step, B, world, accum)
