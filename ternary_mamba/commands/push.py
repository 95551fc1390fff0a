"""`ternary-mamba push FOLDER REPO_ID`: upload one of our folders (packed, hf, student, run) to the Hugging Face hub,
with its model card.  `--dry-run` lists what would be uploaded and prints the card, without the network."""
from __future__ import annotations

from pathlib import Path

from ..core.config import MB
from ..errors import UserError
from ..runtime.load import load_model
from ..formats.paths import resolve_student_dir
from .flags import require

SKIP = ("checkpoint", "metrics.jsonl")   # training state stays local


def plan_upload(folder: Path) -> list[tuple[str, int]]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and not any(part in SKIP for part in p.relative_to(folder).parts)]
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in files]


def push(folder: str, repo_id: str, dry_run: bool = False, private: bool = False) -> list[tuple[str, int]]:
    src = resolve_student_dir(folder)
    if repo_id.count("/") != 1:
        raise UserError(f"{repo_id}: a hub repository id is OWNER/NAME")
    card = src / "README.md"
    if not card.exists():                      # a student or model folder: write the card now
        from ..formats.hf import card_facts, model_card
        (src / "README.md").write_text(model_card(load_model(src), str(src), "ternary-mamba", card_facts(src.parent)))
    files = plan_upload(src)
    print(f"{'would upload' if dry_run else 'uploading'} {len(files)} files from {src} to {repo_id}"
          f"{' (private)' if private else ''}:")
    for name, size in files:
        print(f"  {name:<40} {size / MB:>10.2f} MB")
    if dry_run:
        print("\n--- README.md (model card) ---\n" + card.read_text())
        return files
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push needs huggingface_hub: pip install 'ternary-mamba[hub]'") from None
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(src), repo_id=repo_id, ignore_patterns=[f"{s}*" for s in SKIP] + [".*"])
    except Exception as e:  # noqa: BLE001 - auth, network, permissions: one line
        raise UserError(f"{repo_id}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    print(f"uploaded: https://huggingface.co/{repo_id}")
    return files


def push_command(cfg) -> list[tuple[str, int]]:
    """`ternary-mamba push FOLDER REPO_ID` over its typed config (commands.tool_configs.PushConfig)."""
    require(cfg, "folder", "repo_id", command="push")
    return push(cfg.folder, cfg.repo_id, cfg.dry_run, cfg.private)
