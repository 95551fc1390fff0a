"""Offline lm-eval task definitions: the local evaluation files are normalised to the field names of the
Hugging Face datasets that lm-eval's standard task YAMLs read, and YAMLs with the standard prompts are
written beside them (`dataset_path: json`), so lm-eval itself scores the same prompts offline."""
from __future__ import annotations

import json
from pathlib import Path

from .tasks import jsonl_records

MC = "output_type: multiple_choice\ntest_split: test\nnum_fewshot: 0\n"
# every metric complete (aggregation and direction), so lm-eval fills in nothing and warns about nothing
ACC = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
ACC_NORM = ACC + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"

YAML = {
    "boolq": MC + 'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\ndoc_to_target: label\n'
             'doc_to_choice: ["no", "yes"]\n' + ACC,
    "piqa": MC + 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
            'doc_to_choice: "{{[sol1, sol2]}}"\n' + ACC_NORM,
    "hellaswag": MC + "process_docs: !function tm_utils.hellaswag_docs\ndoc_to_text: \"{{query}}\"\n"
                 "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"choices\"\n" + ACC_NORM,
    "winogrande": MC + "doc_to_text: !function tm_utils.wino_text\ndoc_to_target: !function tm_utils.wino_target\n"
                  "doc_to_choice: !function tm_utils.wino_choice\n" + ACC,
    "arc_easy": MC + 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
                'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n' + ACC_NORM,
    "openbookqa": MC + "doc_to_text: question_stem\ndoc_to_target: \"{{choices.label.index(answerKey.lstrip())}}\"\n"
                  'doc_to_choice: "{{choices.text}}"\n' + ACC_NORM,
    "lambada_openai": "output_type: loglikelihood\ntest_split: test\nnum_fewshot: 0\n"
                      "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                      "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                      "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
}
YAML["arc_challenge"] = YAML["arc_easy"]

UTILS = '''from ternary_mamba.eval.tasks import _hellaswag_pre


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_pre(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_pre(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


def wino_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def wino_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def wino_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
'''


def _normalise(task: str, data_dir: Path) -> list[dict]:
    if task == "boolq":
        return [{**r, "label": int(r["answer"])} for r in jsonl_records(data_dir / "boolq" / "boolq_validation.jsonl")]
    if task == "piqa":
        labels = (data_dir / "piqa" / "valid-labels.lst").read_text().split()
        return [{**r, "label": int(y)} for r, y in zip(jsonl_records(data_dir / "piqa" / "valid.jsonl"), labels)]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        f = {"arc_easy": "arc_easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
             "openbookqa": "openbookqa/openbookqa_main_test.jsonl"}[task]
        out = []
        for r in jsonl_records(data_dir / f):
            labels = [chr(ord("A") + i) for i in range(len(r["choices"]))]
            out.append({**r, "choices": {"text": r["choices"], "label": labels}, "answerKey": labels[int(r["gold"])]})
        return out
    f = {"hellaswag": "hellaswag/hellaswag_val.jsonl", "winogrande": "winogrande/winogrande_xl_dev.jsonl",
         "lambada_openai": "lambada_openai/lambada_test.jsonl"}[task]
    return jsonl_records(data_dir / f)


def write_harness_tasks(tasks: list[str], data_dir: Path, out_dir: Path, limit: int | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tm_utils.py").write_text(UTILS)
    for t in tasks:
        rows = _normalise(t, data_dir)[:limit] if limit else _normalise(t, data_dir)
        data = out_dir / f"{t}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out_dir / f"{t}.yaml").write_text(
            f"task: {t}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" + YAML[t])
    return out_dir


def run_harness(model_path: str, tasks: list[str], data_dir: Path, limit: int | None, batch_size: int) -> dict:
    """Score with lm-eval's own evaluator on the local files; returns {task: {metric: value}}."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness import TernaryMambaLM
    with tempfile.TemporaryDirectory() as tmp:
        write_harness_tasks(tasks, data_dir, Path(tmp), limit)
        tm = TaskManager(include_path=tmp, include_defaults=False)
        lm = TernaryMambaLM(model_path, batch_size=batch_size)
        try:                                   # the local JSON files load in milliseconds: no progress bars
            import datasets
            datasets.disable_progress_bars()
        except ImportError:
            pass
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm)   # zero-shot: the YAMLs say so
    return {t: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, (int, float))}
            for t, r in res["results"].items()}
