"""Data at scale: parquet / arrow tables and hub datasets as --data, and tokenizers for hub checkpoints."""
import numpy as np
import pytest

from conftest import BUNDLED_TOKENIZER
from ternary_mamba.errors import UserError
from ternary_mamba.formats.datasets import HubSource
from ternary_mamba.formats.tokenizer import load_tokenizer, tokenizer_path_for
from ternary_mamba.train.data import load_tokens, tokenize_to_file

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402


DOCS = ["The first document.\nIt has two lines.", "Second: short.", "", "A third one, with more words in it."]


@pytest.fixture
def tok():
    return load_tokenizer(BUNDLED_TOKENIZER)


def _tables(tmp_path):
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    (tmp_path / "pq").mkdir()
    pyarrow.parquet.write_table(table, tmp_path / "pq" / "part-0.parquet", row_group_size=2)
    with pa.OSFile(str(tmp_path / "data.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join('{"text": %s}' % __import__("json").dumps(d) for d in DOCS if d) + "\n")
    return tmp_path / "pq", tmp_path / "data.arrow", jl


def test_parquet_and_arrow_give_the_tokens_jsonl_gives(tmp_path, tok):
    pq, arrow, jl = _tables(tmp_path)
    ref = np.array(load_tokens(tokenize_to_file([jl], tok, tmp_path / "c", verbose=False)))
    for src in (pq, arrow):
        got = np.array(load_tokens(tokenize_to_file([src], tok, tmp_path / "c", verbose=False)))
        assert np.array_equal(got, ref)
    assert (ref == tok.eos_id).sum() == 3          # the empty document is skipped


def test_max_tokens_stops_early_and_is_part_of_the_cache_key(tmp_path, tok):
    pyarrow.parquet.write_table(pa.table({"text": [f"document number {i}." for i in range(2000)]}),
                                tmp_path / "many.parquet")
    full = load_tokens(tokenize_to_file([tmp_path / "many.parquet"], tok, tmp_path / "c", verbose=False))
    part = load_tokens(tokenize_to_file([tmp_path / "many.parquet"], tok, tmp_path / "c", verbose=False,
                                        max_tokens=100))
    assert 100 <= len(part) < len(full) / 4          # stops within one batch of documents past the cap
    assert np.array_equal(np.array(part), np.array(full[:len(part)]))


def test_a_table_without_text_and_an_unreachable_hub_dataset_are_one_line_errors(tmp_path, tok, monkeypatch):
    pyarrow.parquet.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        tokenize_to_file([tmp_path / "bad.parquet"], tok, tmp_path / "c", verbose=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not stream it|needs the datasets package"):
        tokenize_to_file(["hf:no-such-org/no-such-dataset"], tok, tmp_path / "c", verbose=False, max_tokens=10)
    assert HubSource.parse("hf:HuggingFaceFW/fineweb-edu/sample-10BT:train") == \
        HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")


def test_tokenizer_for_a_mamba_ssm_checkpoint_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text('{"d_model": 64, "n_layer": 2, "vocab_size": 512, '
                                          '"ssm_cfg": {"layer": "Mamba2"}}')
    with pytest.raises(UserError, match="GPT-NeoX-20B's; pass tokenizer EleutherAI/gpt-neox-20b"):
        tokenizer_path_for(tmp_path)
    assert tokenizer_path_for(tmp_path, str(BUNDLED_TOKENIZER)) == BUNDLED_TOKENIZER
    with pytest.raises(UserError, match="no tokenizer.json"):
        tokenizer_path_for(tmp_path / "..")
