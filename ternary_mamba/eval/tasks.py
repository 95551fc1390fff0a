"""The zero-shot tasks, read from local files, with the prompts, choices and metrics of
lm-evaluation-harness's standard tasks (lm_eval/tasks/{super_glue/boolq, piqa, hellaswag, winogrande,
arc, openbookqa, lambada}/*.yaml; the target delimiter is " ").

Each task turns a document into requests (context, continuation) and a gold index.  Multiple-choice
tasks report acc and acc_norm (log-likelihood divided by the continuation's length in characters, as
lm-eval); the 7-task average uses the Mamba / Bi-Mamba convention: acc_norm for HellaSwag, ARC-Challenge
and OpenBookQA, acc for BoolQ, PIQA, WinoGrande and ARC-Easy.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError

SEVEN = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
AVERAGE_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                  "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


@dataclass
class Doc:
    contexts: list[str]       # one per choice (winogrande) or the same for all
    continuations: list[str]  # one per choice
    gold: int


def jsonl_records(path: Path) -> list[dict]:
    """The rows of a task file: one JSON object per line (a line that is not says so, with file and line)."""
    if not path.exists():
        raise UserError(f"{path}: task file not found (pass --data-dir pointing at the evals folder)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{path}:{i}: not JSON") from None
        if not isinstance(r, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(r).__name__}")
        rows.append(r)
    return rows


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def boolq(d: Path) -> list[Doc]:
    return [Doc([f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"] * 2, [" no", " yes"], int(r["answer"]))
            for r in jsonl_records(d / "boolq" / "boolq_validation.jsonl")]


def piqa(d: Path) -> list[Doc]:
    rows = jsonl_records(d / "piqa" / "valid.jsonl")
    labels_path = d / "piqa" / "valid-labels.lst"
    if not labels_path.exists():
        raise UserError(f"{labels_path}: task file not found")
    labels = [int(x) for x in labels_path.read_text().split()]
    return [Doc([f"Question: {r['goal']}\nAnswer:"] * 2, [" " + r["sol1"], " " + r["sol2"]], y)
            for r, y in zip(rows, labels)]


def hellaswag(d: Path) -> list[Doc]:
    out = []
    for r in jsonl_records(d / "hellaswag" / "hellaswag_val.jsonl"):
        q = _hellaswag_pre(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        out.append(Doc([q] * len(r["endings"]), [" " + _hellaswag_pre(e) for e in r["endings"]], int(r["label"])))
    return out


def winogrande(d: Path) -> list[Doc]:
    out = []
    for r in jsonl_records(d / "winogrande" / "winogrande_xl_dev.jsonl"):
        i = r["sentence"].index("_")
        target = " " + r["sentence"][i + 1:].strip()
        out.append(Doc([r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]], [target] * 2,
                       {"1": 0, "2": 1}[r["answer"]]))
    return out


def _arc(path: Path) -> list[Doc]:
    return [Doc([f"Question: {r['question']}\nAnswer:"] * len(r["choices"]), [" " + c for c in r["choices"]],
                int(r["gold"])) for r in jsonl_records(path)]


def arc_easy(d: Path) -> list[Doc]:
    return _arc(d / "arc_easy" / "ARC-Easy-Test.jsonl")


def arc_challenge(d: Path) -> list[Doc]:
    return _arc(d / "arc_challenge" / "ARC-Challenge-Test.jsonl")


def openbookqa(d: Path) -> list[Doc]:
    return [Doc([r["question_stem"]] * len(r["choices"]), [" " + c for c in r["choices"]], int(r["gold"]))
            for r in jsonl_records(d / "openbookqa" / "openbookqa_main_test.jsonl")]


def lambada_openai(d: Path) -> list[Doc]:
    out = []
    for r in jsonl_records(d / "lambada_openai" / "lambada_test.jsonl"):
        words = r["text"].split(" ")
        out.append(Doc([" ".join(words[:-1])], [" " + words[-1]], 0))
    return out


TASKS: dict[str, Callable[[Path], list[Doc]]] = {
    "boolq": boolq, "piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande, "arc_easy": arc_easy,
    "arc_challenge": arc_challenge, "openbookqa": openbookqa, "lambada_openai": lambada_openai}


def load_task(name: str, data_dir: Path) -> list[Doc]:
    """A task's documents; a row without a field the task needs (or of the wrong type) is one line naming the task."""
    try:
        docs = TASKS[name](data_dir)
    except KeyError as e:
        raise UserError(f"{name}: a row of its task file (under {data_dir}) has no field {e}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{name}: a row of its task file (under {data_dir}) is malformed ({type(e).__name__}: "
                        f"{str(e)[:80]})") from None
    for i, d in enumerate(docs):
        ok = (len(d.contexts) == len(d.continuations) >= (1 if name == "lambada_openai" else 2)
              and all(isinstance(x, str) for x in d.contexts + d.continuations)
              and type(d.gold) is int and 0 <= d.gold < len(d.continuations))
        if not ok:
            raise UserError(f"{name}: document {i + 1} of its task file (under {data_dir}) has "
                            f"{len(d.continuations)} choices and gold {d.gold!r:.20}: not a valid row")
    return docs


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return SEVEN + ["lambada_openai"]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)} (or 'all')")
    return names
