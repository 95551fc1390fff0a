"""The README's, docs/*.md's and `--help`'s command lines cannot rot: every `ternary-mamba ...` line parses
with today's CLI (flags that exist, choices that are valid), and the ones whose config file ships in the repo
build their typed config."""
import re
import shlex
from pathlib import Path

import pytest

from ternary_mamba.cli import EPILOG, build_parser, typed_config

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    out, buf = [], ""
    for line in text.splitlines():
        line = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if buf:
            buf += " " + line.strip()
        elif "ternary-mamba " in line or "-m ternary_mamba " in line:
            buf = line.strip()
        if buf and buf.endswith("\\"):
            buf = buf[:-1]
            continue
        if buf:
            out.append(buf)
            buf = ""
    return out


def _argv(cmd: str) -> list[str] | None:
    if "..." in cmd or "…" in cmd or "$(" in cmd or "|" in cmd:
        return None                      # a sketch with placeholders, or a pipeline
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", cmd))     # [--optional] flags: the required form
    for i, w in enumerate(words):
        if w.endswith("ternary-mamba") or (w == "ternary_mamba" and words[i - 1] == "-m"):
            return words[i + 1:]
    return None


def _all():
    texts = {"README.md": (ROOT / "README.md").read_text(), "--help epilog": EPILOG,
             **{f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}}
    for where, text in texts.items():
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S) if where != "--help epilog" else [text]
        for block in blocks:
            for cmd in _commands(block):
                argv = _argv(cmd)
                if argv and argv[0] not in ("lm-eval", "--help"):
                    yield where, cmd, argv


CASES = list(_all())


def test_the_docs_have_commands():
    assert len(CASES) >= 30


@pytest.mark.parametrize("where,cmd,argv", CASES, ids=[f"{w}: {c[:60]}" for w, c, _ in CASES])
def test_a_documented_command_parses(where, cmd, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{cmd}` does not parse (exit {e.code})")
    if getattr(args, "typed", None) is not None:
        f = getattr(args, "cfg__file", None)
        if f is None or Path(f).exists() or args.command == "pretrain":
            typed_config(args)           # flags (and a shipped config file) make a valid typed config


def test_the_readme_is_the_products_front_page():
    """What it is, quick start, results, links: short, and no development notes (the machines, ../shared)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "../shared" not in text and "../shared" not in (ROOT / "docs" / "claims" / "results.md").read_text()
    for name in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / name).exists(), name


def test_the_published_claims_are_rendered_from_results_json_alone():
    """docs/claims/results.md and the README's claims section are exactly what results.json renders to: no number
    in them comes from anywhere else."""
    import json
    from ternary_mamba.experiment.results import BEGIN, END, render_markdown, render_readme
    doc = json.loads((ROOT / "docs" / "claims" / "results.json").read_text())
    assert (ROOT / "docs" / "claims" / "results.md").read_text() == render_markdown(doc)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(BEGIN):readme.index(END) + len(END)]
    assert section == render_readme(doc, "docs/claims")


def test_the_claims_header_names_the_set_the_verdicts_are_judged_on():
    """results.md's header says which held-out set the verdict rows use (the rows name it too) and what the arm
    table leads with; every training arm shows its stage wall time."""
    import json
    from ternary_mamba.experiment.results import render_markdown, verdict_set
    doc = json.loads((ROOT / "docs" / "claims" / "results.json").read_text())
    md = render_markdown(doc)
    judged = verdict_set(doc["sets"])
    assert f"verdicts are judged on **{judged}**" in md and f"arms is on **{doc['primary_set']}**" in md
    assert all(v["claim"].endswith(f"[{judged}]") for v in doc["verdicts"] if "rule:" in v["evidence"])
    row = next(line for line in md.splitlines() if line.startswith("| QAT+KD, absmean scales |"))
    assert row.split(" | ")[10] != "-"        # the wall column, filled from stage_wall_s
