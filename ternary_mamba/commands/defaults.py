"""The bundled defaults, in one place: with no --teacher / --data, commands use the teacher, the training books
and the held-out book shipped in `ternary_mamba/assets`."""
from __future__ import annotations

from .. import assets
from ..errors import UserError


def bundled_teacher() -> str:
    if not (assets.TEACHER / "model.safetensors").exists():
        raise UserError(f"the bundled teacher is missing ({assets.TEACHER}); pass --teacher PATH_OR_HUB_ID")
    return str(assets.TEACHER)


def with_bundled_defaults(cfg, held_out_required: bool = False):
    """A copy of `cfg` (any config with teacher / data / eval_data fields) with the bundled teacher and books
    filled in where they are unset.  The bundled held-out book is the default held-out text only when the
    training text is the bundled one too; `held_out_required`: then --eval-data must come with --data."""
    kw = {}
    if cfg.teacher is None:
        kw["teacher"] = bundled_teacher()
    if cfg.data is None:
        kw["data"] = [str(assets.TRAIN_BOOKS)]
        if cfg.eval_data is None:
            kw["eval_data"] = [str(assets.HELDOUT_BOOKS)]
    elif held_out_required and not cfg.eval_data:
        raise UserError("pass --eval-data (held-out text) together with --data")
    return cfg.replace(**kw) if kw else cfg
