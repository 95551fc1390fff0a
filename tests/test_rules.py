"""The claims' pre-registered decision rules (experiment/rules.py): each verdict can come out every way, books are
the resampled unit, and a difference in differences is paired across architectures."""
import numpy as np
import pytest

from ternary_mamba.experiment import rules as R

BOOKS = [0] * 6 + [1] * 6 + [2] * 4        # 16 windows from 3 books


def arm(kl_per_token, seeds=3, seed=0, noise=0.002, zeros=None):
    """An arm's per-seed results: windows of 100 tokens with the given mean KL (+ noise), optional zero ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(seeds):
        kl = kl_per_token + noise * rng.standard_normal(len(BOOKS))
        w = {"tokens": [100] * len(BOOKS), "kl": list(100 * kl), "ce": list(100 * (2 + kl)), "agree": [90] * len(BOOKS)}
        r = {"windows": {"all8": w}}
        if zeros is not None:
            r.update(zero_ratio=zeros[0], zero_ratio_opt=zeros[1])
        out.append(r)
    return out


def test_book_resamples_draw_whole_books_then_their_windows():
    for idx in R.book_resamples(BOOKS, n=50, seed=1):
        books = np.asarray(BOOKS)[idx]
        sizes = sorted(np.bincount(books, minlength=3)[np.bincount(books, minlength=3) > 0])
        assert sum(sizes) == len(idx) and all(s % 2 == 0 for s in sizes)   # multiples of 6, 6 or 4 windows
    assert all(len(i) == 16 for i in R.book_resamples([0] * 16, n=5))       # one book: windows only


@pytest.mark.parametrize("a,b,direction,want", [
    (0.20, 0.10, +1, "held"),            # the predicted difference, clearly
    (0.10, 0.20, +1, "did not hold"),    # the opposite
    (0.10, 0.20, -1, "held"),
    (0.15, 0.15, +1, "inconclusive"),    # no difference: the CI straddles 0
])
def test_a_rule_can_come_out_every_way(a, b, direction, want):
    arms = {"a": arm(a, seed=1), "b": arm(b, seed=2)}
    row = R.apply(R.Rule("k", "claim", "a", "b", "kl", direction, 0.0), arms, "all8", BOOKS)
    assert row["verdict"] == want and row["books"] == 3
    assert row["ci"][0] <= row["estimate"] <= row["ci"][1]


def test_the_margin_decides_and_its_sensitivity_names_where_the_verdict_flips():
    arms = {"a": arm(0.20, seed=1), "b": arm(0.10, seed=2)}
    held = R.apply(R.Rule("k", "c", "a", "b", "kl", +1, 0.05), arms, "all8", BOOKS)
    gone = R.apply(R.Rule("k", "c", "a", "b", "kl", +1, 0.5), arms, "all8", BOOKS)
    assert held["verdict"] == "held" and gone["verdict"] == "did not hold"
    lo, hi = held["ci"]
    assert R.decide(held["ci"], +1, lo - 1e-6) == "held" and R.decide(held["ci"], +1, hi + 1e-6) == "did not hold"
    assert f"{lo:.4g}" in held["sensitivity"] and f"{hi:.4g}" in held["sensitivity"]
    assert "every margin" in R.sensitivity([-0.2, -0.1], +1) and "held at no margin" in R.sensitivity([-0.1, 0.1], +1)


def test_difference_in_differences_is_the_gap_between_two_paired_gaps():
    arms = {"pm": arm(0.30, seed=1), "qm": arm(0.10, seed=2), "pg": arm(0.15, seed=3), "qg": arm(0.10, seed=4)}
    row = R.apply(R.Rule("did", "c", "pm", "qm", "kl", +1, 0.0, c="pg", d="qg"), arms, "all8", BOOKS)
    assert row["estimate"] == pytest.approx((0.30 - 0.10) - (0.15 - 0.10), abs=0.01)
    assert row["verdict"] == "held"
    same = {"pm": arm(0.30, seed=1), "qm": arm(0.10, seed=2), "pg": arm(0.30, seed=3), "qg": arm(0.10, seed=4)}
    assert R.apply(R.Rule("did", "c", "pm", "qm", "kl", +1, 0.0, c="pg", d="qg"), same, "all8",
                   BOOKS)["verdict"] != "held"


def test_collapse_needs_the_cost_and_the_zeros():
    costly = {"a": arm(0.20, seed=1, zeros=(0.60, 0.30)), "b": arm(0.10, seed=2)}
    cheap_zeros = {"a": arm(0.20, seed=1, zeros=(0.31, 0.30)), "b": arm(0.10, seed=2)}
    rule = R.Rule("c", "c", "a", "b", "kl", +1, 0.0, collapse="a")
    assert R.apply(rule, costly, "all8", BOOKS)["verdict"] == "held"
    assert R.apply(rule, cheap_zeros, "all8", BOOKS)["verdict"] == "did not hold"


def test_claim_rows_judge_each_arm_pair_and_drop_what_cannot_fail():
    sets = {"all8": {"window_book": BOOKS}}
    arms = {"qat-absmean": arm(0.10, seed=1), "qat-linear-lr10": arm(0.20, seed=2, zeros=(0.6, 0.3)),
            "scratch-ternary": arm(0.5, seed=3), "scratch-linear-lr10": arm(0.5, seed=4, zeros=(0.3, 0.3)),
            "ptq": arm(0.9, seeds=1, seed=5), "gptq": arm(0.3, seeds=1, seed=6),
            "gpt-ptq": arm(0.9, seeds=1, seed=7), "gpt-gptq": arm(0.12, seeds=1, seed=8),
            "gpt-qat-absmean": arm(0.10, seed=9),
            "qat-absmean-x4": arm(0.08, seed=10), "qat-absmean-x16": arm(0.06, seed=11)}
    for name, t in (("qat-absmean", 100_000), ("qat-absmean-x4", 400_000), ("qat-absmean-x16", 1_600_000)):
        arms[name][0]["tokens"] = t
    rows = {r["key"]: r for r in R.claim_rows(arms, sets, "all8")}
    assert rows["collapse-linear-x10"]["verdict"] == "held"
    assert rows["collapse-scratch-linear-x10"]["verdict"] == "did not hold"
    assert rows["collapse-specific"]["verdict"] == "held"
    assert rows["posthoc-Mamba-2"]["difference"] == "(gptq − qat-absmean)"
    assert rows["because-ssm"]["verdict"] == "held"
    assert rows["budget-curve"]["overtakes_at"] == 100_000
    assert rows["scratch"]["verdict"] == "not tested"
    assert all(R.evidence(r) for r in rows.values())


def test_because_ssm_needs_matched_teachers():
    sets = {"all8": {"window_book": BOOKS}}
    arms = {"qat-absmean": arm(0.10, seed=1), "gptq": arm(0.3, seeds=1, seed=6), "gpt-gptq": arm(0.12, seeds=1, seed=8),
            "gpt-qat-absmean": arm(0.10, seed=9), "teacher": arm(0.0, seeds=1, seed=12),
            "gpt-teacher": arm(0.0, seeds=1, seed=13)}
    rows = {r["key"]: r for r in R.claim_rows(arms, sets, "all8")}
    assert rows["because-ssm"]["verdict"] == "held" and abs(rows["because-ssm"]["teacher_gap"]) < 0.05
    for w in arms["gpt-teacher"]:                                # a weaker control teacher: ppl e^0.5 higher
        w["windows"]["all8"]["ce"] = [c + 50 for c in w["windows"]["all8"]["ce"]]
    row = {r["key"]: r for r in R.claim_rows(arms, sets, "all8")}["because-ssm"]
    assert row["verdict"] == "inconclusive" and row["verdict_unmatched"] == "held"
    assert "not matched" in R.evidence(row)


def test_windows_are_mapped_to_the_book_they_start_in(tmp_path):
    """stats.window_books: each file of a set tokenized on its own; a window belongs to the file its first token
    is in (what the book bootstrap resamples)."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.experiment.stats import window_books
    from ternary_mamba.formats.tokenizer import load_tokenizer
    from ternary_mamba.train.data import PackedSequences, load_tokens, tokenize_to_file
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("alpha beta gamma delta. " * 200)
    (d / "b.txt").write_text("one two three four five. " * 50)
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    seqs = PackedSequences(load_tokens(tokenize_to_file([str(d)], tok, tmp_path / "c", False)), 32)
    n_a = len(load_tokens(tokenize_to_file([str(d / "a.txt")], tok, tmp_path / "c", False)))
    got = window_books([str(d)], tok, seqs, list(range(len(seqs))))
    assert got["books"] == ["a.txt", "b.txt"]
    assert got["window_book"] == [0 if w * 32 < n_a else 1 for w in range(len(seqs))]
    assert 0 < got["window_book"].count(1) < len(seqs)
