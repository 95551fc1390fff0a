"""Evaluation on tiny synthetic task files (no ../shared): metrics by hand, the lm-eval adapter against
our own scoring, and lm-eval's evaluator on the generated offline task YAMLs against ours."""
import json
import math

import pytest
import torch

from ternary_mamba.errors import UserError
from ternary_mamba.eval.evaluate import evaluate_model, score_task
from ternary_mamba.eval.scoring import encode_pair, loglikelihoods
from ternary_mamba.eval.tasks import Doc, parse_tasks


@pytest.fixture(scope="module")
def evals_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals")
    def w(rel, rows):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w("boolq/boolq_validation.jsonl", [{"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
                                       {"question": "is fire cold", "passage": "Fire is hot.", "answer": False}])
    w("piqa/valid.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."}] * 2)
    (d / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    w("hellaswag/hellaswag_val.jsonl", [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                                         "endings": ["cries [title] a lot.", "flies.", "sings.", "sleeps."], "label": 0}])
    w("winogrande/winogrande_xl_dev.jsonl", [{"sentence": "Anna gave Bob a book because _ was kind.",
                                              "option1": "Anna", "option2": "Bob", "answer": "1"}])
    for t, f in (("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl")):
        w(f"{t}/{f}", [{"id": "1", "question": "What is hot?", "choices": ["ice", "the sun", "snow"], "gold": 1}])
    w("openbookqa/openbookqa_main_test.jsonl", [{"id": "1", "question_stem": "Plants need",
                                                 "choices": ["light", "rocks", "plastic", "metal"], "gold": 0}])
    w("lambada_openai/lambada_test.jsonl", [{"text": "Alice was beginning to get very tired of sitting by her sister"}])
    return d


def test_acc_and_acc_norm_by_hand():
    class Fixed:  # a fake model result: score_task only needs loglikelihoods, patched below
        pass
    docs = [Doc(["q"] * 2, [" a", " bbbbbbbb"], 1)]
    import ternary_mamba.eval.evaluate as ev
    orig = ev.loglikelihoods
    ev.loglikelihoods = lambda *a, **k: [(-1.0, False), (-4.0, False)]
    try:
        r = score_task(None, None, "piqa", docs, 1, 64)
    finally:
        ev.loglikelihoods = orig
    # acc: -1 > -4 picks choice 0 (wrong); acc_norm: -1/1 < -4/8 = -0.5 picks choice 1 (right)
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
    assert r["chance"] == 0.5                         # two choices: a uniform guess scores 50 %
    from ternary_mamba.eval.evaluate import markdown_table
    table = markdown_table([{"model": "m", "tasks": {"piqa": r}, "avg7": None}], ["piqa"])
    assert table.splitlines()[-1] == "| *chance (uniform guess)* | 50.0 |"


def test_loglikelihood_equals_direct_model_scoring(tiny_teacher_dir):
    from ternary_mamba import load_model, load_tokenizer
    model, tok = load_model(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    pairs = [("The cat sat on the", " mat"), ("Once upon a time ", "there was"), ("", "Hello")]
    got = loglikelihoods(model, tok, pairs, batch_size=2)
    for (c, x), (ll, _) in zip(pairs, got):
        ctx, cont = encode_pair(tok, c, x)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0, :, :model.config.vocab_size], -1)
        ref = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert math.isclose(ll, ref, rel_tol=1e-5, abs_tol=1e-4)


def test_lm_eval_adapter_matches_our_scoring(tiny_teacher_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from ternary_mamba.eval.harness import TernaryMambaLM
    lm = TernaryMambaLM.create_from_arg_string(f"pretrained={tiny_teacher_dir},batch_size=2")
    pairs = [("The cat sat on the", " mat"), ("It was", " the best of times")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    assert lm.loglikelihood(reqs) == loglikelihoods(lm.model, lm.tok, pairs, batch_size=2)


def test_our_evaluator_agrees_with_lm_eval_on_generated_tasks(tiny_teacher_dir, evals_dir, caplog):
    """... and the task files we write are complete: lm-eval fills in no default and warns about nothing."""
    import logging
    pytest.importorskip("lm_eval")
    from ternary_mamba.eval.harness_tasks import run_harness
    tasks = parse_tasks("all")
    ours = evaluate_model(str(tiny_teacher_dir), tasks, evals_dir, None, 4, 1024, log=lambda *_: None)["tasks"]
    with caplog.at_level(logging.INFO):
        theirs = run_harness(str(tiny_teacher_dir), tasks, evals_dir, None, 4)
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or "using default" in
             r.getMessage() or "Overwriting default" in r.getMessage()]
    assert not noise, noise[:3]
    for t in tasks:
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in theirs[t]:
                assert math.isclose(ours[t][metric], theirs[t][metric], rel_tol=1e-6), (t, metric)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="known: boolq"):
        parse_tasks("boolq,mmlu")
    from ternary_mamba.eval.tasks import TASKS
    with pytest.raises(UserError, match="task file not found"):
        TASKS["piqa"](tmp_path)


@pytest.mark.parametrize("content,msg", [("not json\n", "boolq_validation.jsonl:1: not JSON"),
                                         ("[1, 2]\n", "expected a JSON object, got list"),
                                         ('{"question": "q", "passage": "p"}\n', "has no field 'answer'")])
def test_a_bad_task_row_is_one_line(tmp_path, content, msg):
    from ternary_mamba.eval.tasks import load_task
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "boolq_validation.jsonl").write_text(content)
    with pytest.raises(UserError, match=msg):
        load_task("boolq", tmp_path)
