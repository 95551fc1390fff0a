"""`ternary-mamba report RUN`: (re)generate a run folder's report.md with its plots."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..train.report import make_report
from .flags import require
from ..log import say


def report(cfg) -> Path:
    """cfg: commands.tool_configs.ReportConfig.  Returns the report's path."""
    require(cfg, "run", command="report")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("report needs matplotlib: pip install 'ternary-mamba[plot]'") from None
    out = make_report(cfg.run)
    say(f"wrote {out}")
    return out
