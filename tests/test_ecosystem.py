"""Fits the ecosystem: Hugging Face export (transformers loads it, logits equal ours) and push --dry-run, GGUF
accepted everywhere, quantize --target gguf exporting TQ2_0 by default, the bundled teacher by name, lm-eval's
own CLI, --version."""
import json

import pytest
import torch

from ternary_mamba.cli import main


def _quantize(teacher, text, out, *extra):
    n = torch.get_num_threads()
    try:
        return main(["quantize", "--teacher", str(teacher), "--data", str(text), "--tokens", "2048", "--seq-len",
                     "64", "--batch-size", "4", "--eval-every", "0", "--final-eval-batches", "1", "--out", str(out),
                     *extra])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tiny_teacher_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eco") / "run"
    assert _quantize(tiny_teacher_dir, text_dir, out, "--group-size", "32", "--scale-mode", "guarded") == 0
    return out


def test_hf_export_loads_in_transformers_with_our_logits(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    assert main(["export", str(run), "--format", "hf", "--hf-dtype", "fp32", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from ternary_mamba import load_model
    ours = load_model(run)
    ids = torch.randint(0, 8192, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)[..., :8192]
    assert (a[..., :8192] - b).abs().max() < 1e-3
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "group size | 32" in card and "heldout ppl" in card and "library_name: transformers" in card
    capsys.readouterr()
    assert main(["push", str(tmp_path / "hf"), "me/ternary-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 4 files" in out and "model.safetensors" in out and "# " in out


def test_target_gguf_exports_tq2_by_default_and_gguf_is_accepted_everywhere(tiny_teacher_dir, text_dir, tmp_path,
                                                                            capsys):
    pytest.importorskip("gguf")
    assert _quantize("bundled", text_dir, tmp_path / "g", "--target", "gguf") == 0    # d_model 256: TQ-able
    assert json.loads((tmp_path / "g" / "run.json").read_text())["config"]["quant"]["group_size"] == 256
    assert main(["export", str(tmp_path / "g"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "as TQ2_0" in capsys.readouterr().out
    gguf = str(tmp_path / "m.gguf")
    assert main(["info", gguf]) == 0 and "TQ2_0 x16" in capsys.readouterr().out   # the table alone, nothing read
    assert main(["ppl", gguf, "--text", str(text_dir), "--seq-len", "64", "--max-tokens", "512"]) == 0
    assert "m.gguf" in capsys.readouterr().out
    assert main(["export", gguf, "--format", "tq1", "--out", str(tmp_path / "from-gguf")]) == 0
    assert (tmp_path / "from-gguf" / "tokenizer.json").exists() and (tmp_path / "from-gguf" / "README.md").exists()


def test_the_bundled_teacher_by_name_and_the_version(capsys):
    assert main(["info", "bundled"]) == 0 and "d_model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "ternary-mamba 0.1.0" in capsys.readouterr().out


def test_lm_eval_takes_its_own_flags(capsys):
    pytest.importorskip("lm_eval")
    with pytest.raises(SystemExit) as e:
        main(["lm-eval", "--help"])
    assert e.value.code == 0 and "Language Model Evaluation Harness" in capsys.readouterr().out


def test_metric_sinks_write_what_reads_back(tiny_teacher_dir, text_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "logged"
    assert _quantize(tiny_teacher_dir, text_dir, out, "--group-size", "32", "--log-to", "csv", "tensorboard", "wandb",
                     "--log-every", "2") == 0
    import csv
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"loss", "kl", "grad_norm"} <= {r["name"] for r in rows} and int(rows[-1]["step"]) == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("kl")) == 8
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_run_in_progress_is_sampled_from_its_checkpoint(run, tmp_path, capsys):
    import shutil
    prog = tmp_path / "prog"
    shutil.copytree(run, prog)
    shutil.rmtree(prog / "student")
    (prog / "summary.json").unlink()
    assert main(["generate", str(prog), "--prompt", "Once", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert "a run in progress; using its checkpoint at step" in capsys.readouterr().err
    assert main(["info", str(prog)]) == 0 and "last checkpoint at step" in capsys.readouterr().out


def _tree(root):
    """Every path under root with its bytes (files) or its target (symlinks): what 'unchanged' means."""
    import hashlib
    import os
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                out[p] = "dir"
    return out


@pytest.mark.parametrize("card", ["missing", "dangling symlink"])
def test_push_dry_run_writes_nothing_anywhere(run, tmp_path, capsys, card):
    import shutil
    folder = tmp_path / "student"
    shutil.copytree(run / "student", folder)
    (folder / "README.md").unlink(missing_ok=True)
    target = tmp_path / "outside" / "README.md"
    if card == "dangling symlink":
        (folder / "README.md").symlink_to(target)
    before = _tree(tmp_path)
    assert main(["push", str(folder), "me/ternary-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "README.md" in out and "--- README.md (model card) ---" in out
    assert _tree(tmp_path) == before and not target.exists()


@pytest.mark.parametrize("repo", ["owner/", "/name", "owner", "a/b/c", "own er/x"])
def test_push_refuses_a_malformed_repo_id(run, repo, capsys):
    assert main(["push", str(run / "student"), repo, "--dry-run"]) == 1
    assert "OWNER/NAME" in capsys.readouterr().err


def test_cards_carry_valid_metadata_and_no_machine_paths(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "tq2", "--out", str(tmp_path / "p")]) == 0
    card = (tmp_path / "p" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model" not in front                   # a local teacher is no hub id
    hub = pytest.importorskip("huggingface_hub")
    data = hub.ModelCard(card).data.to_dict()          # the hub's own parser reads the metadata
    assert data["library_name"] == "ternary-mamba" and "ternary" in data["tags"]
    from ternary_mamba.formats.hf import card_metadata
    assert hub.ModelCard("---\n" + card_metadata("hf", "state-spaces/mamba2-130m").strip() + "\n---\n").data.base_model == \
        "state-spaces/mamba2-130m"
    assert "base_model" not in card_metadata("hf", "/abs/path/teacher") and "base_model" not in card_metadata(
        "hf", "./teacher")
    assert str(tmp_path) not in card and str(run) not in card
    capsys.readouterr()
    assert main(["push", str(run), "me/x", "--dry-run"]) == 1
    assert "push an export of it" in capsys.readouterr().err
