"""Fuzz cases for the files a run reads besides the model: optimizer and trainer state of a checkpoint, metrics
lines, summaries, data records, eval task rows and GGUF metadata.  Each mutated input must be refused with a
`UserError` (one line at the CLI) or be used without any other exception — for the optimizer state that means a
real AdamW step after loading it (a moment of the wrong shape once reached the fused kernel and crashed).
The ASan job runs these too (scripts/test_asan.sh); FUZZ_EXAMPLES raises the count, as in test_fuzz.py."""
import json
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import BUNDLED_TOKENIZER, random_model, tiny_config  # noqa: E402
from ternary_mamba.errors import UserError  # noqa: E402

N = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=True),
                   st.text(max_size=6))
ODD = st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.text(max_size=3), SCALAR, max_size=2))


def _nested(depth: int):
    return "[" * depth + "]" * depth


# ---- optimizer state ---------------------------------------------------------------------------------------

def _trained():
    """A tiny model and its fused AdamW after one step (fresh for every case: loading mutates both)."""
    from ternary_mamba.train import distributed as D
    from ternary_mamba.train.objectives import param_groups
    model = random_model(tiny_config())
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), fused=True)
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    opt.step()
    msd, osd = D.full_state(model, opt)
    return model, opt, msd, osd


def _tensor(data):
    shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]))
    return torch.zeros(shape, dtype=dtype)


@FUZZ
@given(st.data())
def test_optimizer_state(data):
    from ternary_mamba.train import distributed as D
    from ternary_mamba.train.loop import check_optimizer_state
    model, opt, msd, osd = _trained()
    osd = {"state": {k: dict(v) for k, v in osd["state"].items()},
           "param_groups": [dict(g, params=list(g["params"])) for g in osd["param_groups"]]}
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["moment", "drop-state", "group-setting", "group-params", "top"]))
        if what == "moment":
            name = data.draw(st.sampled_from(sorted(osd["state"])))
            key = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq", "step"]))
            osd["state"][name][key] = _tensor(data) if data.draw(st.booleans()) else data.draw(ODD)
        elif what == "drop-state":
            osd["state"].pop(data.draw(st.sampled_from(sorted(osd["state"]))), None)
        elif what == "group-setting":
            g = data.draw(st.sampled_from(osd["param_groups"]))
            g[data.draw(st.sampled_from(["lr", "betas", "eps", "weight_decay", "fused", "amsgrad"]))] = data.draw(ODD)
        elif what == "group-params":
            g = data.draw(st.sampled_from(osd["param_groups"]))
            params = g["params"] if isinstance(g["params"], list) else []
            g["params"] = data.draw(st.one_of(st.just(params[1:]), st.just(params + ["x.weight"]), ODD))
        else:       # the whole file replaced: nothing further to mutate
            osd = data.draw(st.one_of(ODD, st.just({"state": osd["state"]}), st.just({**osd, "state": []})))
            break
    try:
        check_optimizer_state(osd, model, opt, 1, "optimizer.pt")
    except UserError:
        return
    # accepted: it must load and step like a healthy state (the Trainer turns a load mismatch into a UserError)
    try:
        D.load_full_state(model, opt, msd, osd)
    except (RuntimeError, KeyError, ValueError):
        return
    model.zero_grad()
    model(torch.tensor([[1, 2, 3, 4]])).sum().backward()
    opt.step()


# ---- trainer state, metrics, summaries ---------------------------------------------------------------------

@FUZZ
@given(st.one_of(ODD, st.dictionaries(st.sampled_from(["step", "world_size", "x"]), ODD, max_size=3),
                 st.just(_nested(100_000))))
def test_trainer_state(tmp_path_factory, value):
    from ternary_mamba.formats.records import read_trainer_state
    p = tmp_path_factory.mktemp("ts") / "trainer_state.json"
    p.write_text(value if isinstance(value, str) and value.startswith("[[") else json.dumps(value))
    try:
        s = read_trainer_state(p, total_steps=100)
    except UserError:
        return
    assert type(s["step"]) is int and 0 <= s["step"] <= 100


@FUZZ
@given(st.lists(st.one_of(ODD.map(json.dumps), st.dictionaries(st.sampled_from(["step", "loss", "zero_ratio_layers"]),
                                                               ODD, max_size=3).map(json.dumps),
                          st.text(max_size=20), st.just(_nested(50_000))), max_size=5))
def test_metrics_lines(tmp_path_factory, lines):
    from ternary_mamba.formats.records import read_metrics
    p = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    p.write_text("\n".join(lines))
    try:
        rows = read_metrics(p)
    except UserError:
        return
    assert all(type(r["step"]) is int for r in rows)


@FUZZ
@given(st.dictionaries(st.sampled_from(["rows", "tokens", "heldout_ppl", "wall_s", "kernel_paths"]),
                       st.one_of(ODD, st.dictionaries(st.text(max_size=4), st.dictionaries(st.text(max_size=4), ODD,
                                                                                          max_size=2), max_size=2)),
                       max_size=4))
def test_summaries(tmp_path_factory, summary):
    from ternary_mamba.formats.records import read_summary
    p = tmp_path_factory.mktemp("s") / "summary.json"
    p.write_text(json.dumps(summary))
    try:
        s = read_summary(p)
    except UserError:
        return
    import math
    rows = s.get("rows", {})          # accepted: rows of finite numbers, the totals numbers
    assert isinstance(rows, dict) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                          for r in rows.values() for v in r.values())
    assert all(isinstance(s[k], (int, float)) for k in ("tokens", "heldout_ppl", "wall_s") if k in s)


# ---- data records and eval rows ----------------------------------------------------------------------------

@FUZZ
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["text", "id"]), ODD, max_size=2).map(json.dumps),
                          ODD.map(json.dumps), st.text(max_size=12), st.just(_nested(50_000))), max_size=4))
def test_data_records(tmp_path_factory, lines):
    from ternary_mamba.formats.text import read_documents
    p = tmp_path_factory.mktemp("d") / "corpus.jsonl"
    p.write_text("\n".join(lines))
    try:
        docs = read_documents(p)
    except UserError:
        return
    assert all(isinstance(d, str) for d in docs)


ROWS = {"boolq": ("boolq/boolq_validation.jsonl", {"passage": "p", "question": "q", "answer": True}),
        "hellaswag": ("hellaswag/hellaswag_val.jsonl", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c",
                                                        "endings": ["d", "e", "f", "g"], "label": "1"}),
        "winogrande": ("winogrande/winogrande_xl_dev.jsonl", {"sentence": "a _ b", "option1": "x", "option2": "y",
                                                              "answer": "1"}),
        "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl", {"question": "q", "choices": ["a", "b"], "gold": 1}),
        "openbookqa": ("openbookqa/openbookqa_main_test.jsonl", {"question_stem": "q", "choices": ["a", "b"],
                                                                 "gold": 0}),
        "lambada_openai": ("lambada_openai/lambada_test.jsonl", {"text": "one two three"})}


@FUZZ
@given(st.sampled_from(sorted(ROWS)), st.data())
def test_eval_rows(tmp_path_factory, task, data):
    from ternary_mamba.eval.tasks import load_task
    rel, row = ROWS[task]
    row = dict(row)
    for _ in range(data.draw(st.integers(1, 2))):
        if not row:
            break
        key = data.draw(st.sampled_from(sorted(row)))
        if data.draw(st.booleans()):
            row[key] = data.draw(ODD)
        else:
            row.pop(key)
    d = tmp_path_factory.mktemp("evals")
    (d / rel).parent.mkdir(parents=True)
    (d / rel).write_text(json.dumps(row) + "\n" + data.draw(st.sampled_from(["", "{", "[]", _nested(50_000)])))
    try:
        docs = load_task(task, d)
    except UserError:
        return
    assert all(0 <= doc.gold < len(doc.continuations) for doc in docs)


# ---- GGUF metadata -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_fields(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    from ternary_mamba.formats.gguf import export_gguf
    p = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(random_model(tiny_config(vocab_size=8192)), p, "f16", BUNDLED_TOKENIZER)
    r = gguf.GGUFReader(p)
    fields = {k: (f.contents(), f.types) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, t.data.copy(), t.tensor_type) for t in r.tensors]
    return fields, tensors


def _gguf_value(data):
    from gguf import GGUFValueType as T
    kind = data.draw(st.sampled_from(["int", "uint", "float", "str", "bool", "ints", "strs"]))
    if kind == "int":
        return data.draw(st.integers(-2**31, 2**31 - 1)), [T.INT32]
    if kind == "uint":
        return data.draw(st.integers(0, 2**32 - 1)), [T.UINT32]
    if kind == "float":
        return data.draw(st.floats(width=32)), [T.FLOAT32]
    if kind == "bool":
        return data.draw(st.booleans()), [T.BOOL]
    if kind == "ints":
        return data.draw(st.lists(st.integers(-5, 5), min_size=1, max_size=4)), [T.ARRAY, T.INT32]
    if kind == "strs":
        return data.draw(st.lists(st.text(max_size=4), min_size=1, max_size=4)), [T.ARRAY, T.STRING]
    return data.draw(st.text(max_size=8)), [T.STRING]


@FUZZ
@given(st.data())
def test_gguf_metadata(gguf_fields, tmp_path_factory, data):
    import gguf
    from ternary_mamba.runtime.load import load_model, load_tokenizer
    fields, tensors = gguf_fields
    fields = dict(fields)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(fields)))
        choice = data.draw(st.sampled_from(["value", "drop", "trim-list"]))
        if choice == "drop" and key != "general.architecture":
            fields.pop(key)
        elif choice == "trim-list" and isinstance(fields[key][0], list):
            fields[key] = (fields[key][0][:data.draw(st.integers(1, max(1, len(fields[key][0]))))], fields[key][1])
        else:
            fields[key] = _gguf_value(data)
    arch = fields.pop("general.architecture")[0]
    p = tmp_path_factory.mktemp("g") / "m.gguf"
    w = gguf.GGUFWriter(p, arch if isinstance(arch, str) else str(arch))
    for key, (value, types) in fields.items():
        w.add_key_value(key, value, types[0], types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
    for name, arr, qtype in tensors:
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    try:                               # accepted: a model that runs, logits of its vocabulary
        m = load_model(p)
        with torch.no_grad():
            out = m(torch.tensor([[1, 2, 3]]) % m.config.vocab_size)
        assert out.shape[:2] == (1, 3) and out.shape[-1] >= m.config.vocab_size
    except UserError:
        pass
    try:                               # accepted: a tokenizer that round-trips text
        tok = load_tokenizer(p)
        assert isinstance(tok.encode("hello world"), list)
    except UserError:
        pass
