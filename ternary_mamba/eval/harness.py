"""lm-evaluation-harness model adapter, registered as `ternary-mamba` (entry point `lm_eval.models`):

    lm_eval run --model ternary-mamba --model_args pretrained=PATH,batch_size=16 --tasks hellaswag

PATH is any model / QAT run / packed folder.  Scoring is the same batched code as `ternary-mamba eval`."""
from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import UserError
from ..formats.folders import find_tokenizer
from ..runtime.load import load_model
from ..formats.paths import resolve_student_dir
from ..formats.tokenizer import load_tokenizer
from ..runtime.generate import generate_ids
from .scoring import loglikelihoods


@register_model("ternary-mamba")
class TernaryMambaLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str = 16, max_length: int | str = 1024,
                 max_gen_toks: int | str = 256, **kwargs):
        super().__init__()
        folder = resolve_student_dir(pretrained)
        self.model = load_model(folder)
        tp = find_tokenizer(folder)
        if tp is None:
            raise UserError(f"{folder}: no tokenizer.json next to the model")
        self.tok = load_tokenizer(tp)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, self.tok, [r.args[:2] for r in requests], self.batch_size, self.max_length)

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        from .perplexity import text_perplexity
        import math
        out = []
        for r in requests:
            res = text_perplexity(self.model, self.tok, [r.args[0]], self.max_length, self.batch_size)
            out.append(-math.log(res["ppl"]) * res["tokens"])
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids: list[int] = []
            text = ""
            for t in generate_ids(self.model, self.tok.encode(context), int(kw.get("max_gen_toks", self.max_gen_toks)),
                                  temperature=0.0, stop_id=self.tok.eos_id):
                ids.append(t)
                text = self.tok.decode(ids)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
