"""The arms of the claims experiment: which post-hoc methods, QAT runs and from-scratch controls it runs, the
models whose error along the recurrence it analyses, and its held-out window."""
from __future__ import annotations

POSTHOC = {  # name -> PtqConfig settings
    "ptq": {},
    "ptq-bias": {"correct": ("bias",)},
    "ptq-lowrank": {"correct": ("lowrank",), "plain_svd": True},
    "ptq-lowrank-aw": {"correct": ("lowrank",)},
    "ptq-qep": {"correct": ("qep",)},
    "ptq-qep-lowrank": {"correct": ("qep", "lowrank")},
}
QAT = {  # name -> (label, scale mode, scale lr multiplier)
    "qat-absmean": ("QAT+KD, absmean scales", "absmean", 1.0),
    "qat-learned": ("QAT+KD, learned scales", "learned", 1.0),
    "qat-guarded": ("QAT+KD, guarded scales", "guarded", 1.0),
    "qat-learned-lr10": ("QAT+KD, learned scales, scale lr x10", "learned", 10.0),
    "qat-guarded-lr10": ("QAT+KD, guarded scales, scale lr x10", "guarded", 10.0),
}
SCRATCH = {  # name -> (label, ternary?)
    "scratch-ternary": ("from scratch, ternary (same tokens)", True),
    "scratch-fp": ("from scratch, full precision (same tokens)", False),
}
ANALYSED = ("ptq", "ptq-bias", "ptq-lowrank", "ptq-qep", "qat-absmean", "qat-guarded")
SEQ_LEN, EVAL_BATCHES = 256, 16
