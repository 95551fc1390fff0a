"""The arms of the claims experiment: post-hoc methods, QAT runs, from-scratch controls, the Transformer
control, and the models whose error along the recurrence is analysed.

Every training arm runs once per seed (the seed orders the data and, from scratch, initialises the model);
post-hoc arms are deterministic given the calibration windows."""
from __future__ import annotations

POSTHOC = {  # name -> (PtqConfig settings, calibration budget: "small" | "large")
    "ptq": ({}, "small"),
    "ptq-bias": ({"correct": ("bias",)}, "small"),
    "ptq-lowrank": ({"correct": ("lowrank",), "plain_svd": True}, "small"),
    "ptq-lowrank-aw": ({"correct": ("lowrank",)}, "small"),
    "ptq-qep": ({"correct": ("qep",)}, "small"),
    "ptq-qep-lowrank": ({"correct": ("qep", "lowrank")}, "small"),
    "gptq": ({"correct": ("gptq",)}, "small"),
    "gptq-lowrank": ({"correct": ("gptq", "lowrank")}, "small"),
    "gptq-bias": ({"correct": ("gptq", "bias")}, "small"),
    "ptq-qep-lowrank-L": ({"correct": ("qep", "lowrank")}, "large"),
    "gptq-L": ({"correct": ("gptq",)}, "large"),
    "gptq-lowrank-L": ({"correct": ("gptq", "lowrank")}, "large"),
}
# name -> (label, TernaryConfig settings, DistillConfig settings)
QAT = {
    "qat-absmean": ("QAT+KD, absmean scales", {"scale_mode": "absmean"}, {}),
    "qat-learned": ("QAT+KD, learned scales (log)", {"scale_mode": "learned"}, {}),
    "qat-learned-linear": ("QAT+KD, learned scales (linear)", {"scale_mode": "learned", "scale_param": "linear"}, {}),
    "qat-frozen": ("QAT+KD, scales frozen at init", {"scale_mode": "frozen"}, {}),
    "qat-guarded": ("QAT+KD, guarded scales", {"scale_mode": "guarded"}, {}),
    "qat-learned-lr3": ("QAT+KD, learned (log), scale lr x3", {"scale_mode": "learned"}, {"scale_lr_mult": 3.0}),
    "qat-learned-lr10": ("QAT+KD, learned (log), scale lr x10", {"scale_mode": "learned"}, {"scale_lr_mult": 10.0}),
    "qat-learned-lr30": ("QAT+KD, learned (log), scale lr x30", {"scale_mode": "learned"}, {"scale_lr_mult": 30.0}),
    "qat-linear-lr10": ("QAT+KD, learned (linear), scale lr x10",
                        {"scale_mode": "learned", "scale_param": "linear"}, {"scale_lr_mult": 10.0}),
    "qat-guarded-lr30": ("QAT+KD, guarded, scale lr x30", {"scale_mode": "guarded"}, {"scale_lr_mult": 30.0}),
    "qat-guarded-linear-lr10": ("QAT+KD, guarded (linear), scale lr x10",
                                {"scale_mode": "guarded", "scale_param": "linear"}, {"scale_lr_mult": 10.0}),
    "qat-state": ("QAT+KD + state distillation, absmean", {"scale_mode": "absmean"}, {"gamma_state": 1.0}),
}
SCALE_LR_SWEEP = ("qat-learned", "qat-learned-lr3", "qat-learned-lr10", "qat-learned-lr30")
# The QAT token-budget sweep: name -> (the arm it repeats, its tokens as a multiple of --tokens: 0.1 M -> 0.4 M and
# 1.6 M at the default, how many of the seeds run it); the same for the GPT control.  16x runs the first seed only:
# its 3 seeds x 2 architectures alone would take ~1.8 h of the experiment's ~3 h on 2 cores.
BUDGETS = {"qat-absmean-x4": ("qat-absmean", 4, 3), "qat-absmean-x16": ("qat-absmean", 16, 1)}
SCRATCH = {  # name -> (label, TernaryConfig settings or None for full precision, scale lr multiplier)
    "scratch-ternary": ("from scratch, ternary absmean (same tokens)", {"scale_mode": "absmean"}, 1.0),
    "scratch-ternary-learned": ("from scratch, ternary learned (same tokens)", {"scale_mode": "learned"}, 1.0),
    "scratch-linear-lr10": ("from scratch, learned (linear), scale lr x10 (same tokens)",
                            {"scale_mode": "learned", "scale_param": "linear"}, 10.0),
    "scratch-fp": ("from scratch, full precision (same tokens)", None, 1.0),
}
CONTROL_POSTHOC = ("ptq", "ptq-bias", "ptq-lowrank-aw", "ptq-qep", "ptq-qep-lowrank", "gptq", "gptq-lowrank",
                   "gptq-L", "gptq-lowrank-L", "ptq-qep-lowrank-L")     # the same calibration as Mamba-2's arms
ANALYSED = ("ptq", "ptq-qep-lowrank", "gptq-lowrank", "qat-absmean", "qat-learned", "qat-state")
SEQ_LEN = 256
