"""Files: the project's model folders, mamba_ssm / transformers folders, packed ternary folders, GGUF,
tokenizers, model configs and presets, sizes, crash-safe writes, and one `load_model` for all of them."""
