"""`ternary-mamba push FOLDER REPO_ID`: upload one of our folders (packed, hf, student, run) to the Hugging Face hub,
with its model card.  `--dry-run` lists what would be uploaded and prints the card, without the network."""
from __future__ import annotations

import re
from pathlib import Path

from ..core.config import MB
from ..errors import UserError
from ..runtime.load import load_model
from ..formats.paths import resolve_student_dir
from .flags import require
from ..log import say

SKIP = ("checkpoint", "metrics.jsonl")   # training state stays local


REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def plan_upload(folder: Path) -> list[tuple[str, int]]:
    """The files that would go up: regular files inside the folder (no training state, no hidden files, no symlink,
    which could point anywhere)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
             and not any(part in SKIP for part in p.relative_to(folder).parts)]
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in files]


def push(folder: str, repo_id: str, dry_run: bool = False, private: bool = False) -> list[tuple[str, int]]:
    """Upload `folder` (a packed, hf, student or run folder) with its model card.  Nothing is written locally:
    a folder without a card (or whose README.md is a symlink) gets one generated in memory and uploaded as such."""
    if (Path(folder) / "run.json").exists():
        raise UserError(f"{folder}: a run folder holds the fp32 fake-quant student; push an export of it "
                        f"(ternary-mamba export {folder} --format tq2 --out DIR, or --format hf) instead")
    src = resolve_student_dir(folder)
    if not REPO_ID.match(repo_id):
        raise UserError(f"{repo_id!r}: a hub repository id is OWNER/NAME (letters, digits, '.', '_', '-')")
    card = src / "README.md"
    own_card = not (card.is_file() and not card.is_symlink())
    if own_card:                               # a student or model folder: the card is made now, in memory
        from ..formats.hf import card_facts, model_card
        card_text = model_card(load_model(src), str(src), "ternary-mamba", card_facts(src.parent))
    else:
        card_text = card.read_text()
    files = [f for f in plan_upload(src) if not (own_card and f[0] == "README.md")]
    if own_card:
        files.append(("README.md", len(card_text.encode())))
    say(f"{'would upload' if dry_run else 'uploading'} {len(files)} files from {src} to {repo_id}"
          f"{' (private)' if private else ''}:")
    for name, size in files:
        say(f"  {name:<40} {size / MB:>10.2f} MB")
    if dry_run:
        say("\n--- README.md (model card) ---\n" + card_text)
        return files
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push needs huggingface_hub: pip install 'ternary-mamba[hub]'") from None
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        ignore = [f"{s}*" for s in SKIP] + [".*"] + (["README.md"] if own_card else [])
        ignore += [str(p.relative_to(src)) for p in src.rglob("*") if p.is_symlink()]
        api.upload_folder(folder_path=str(src), repo_id=repo_id, ignore_patterns=ignore)
        if own_card:
            api.upload_file(path_or_fileobj=card_text.encode(), path_in_repo="README.md", repo_id=repo_id)
    except Exception as e:  # noqa: BLE001 - auth, network, permissions: one line
        raise UserError(f"{repo_id}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    say(f"uploaded: https://huggingface.co/{repo_id}")
    return files


def push_command(cfg) -> list[tuple[str, int]]:
    """`ternary-mamba push FOLDER REPO_ID` over its typed config (commands.tool_configs.PushConfig)."""
    require(cfg, "folder", "repo_id", command="push")
    return push(cfg.folder, cfg.repo_id, cfg.dry_run, cfg.private)
