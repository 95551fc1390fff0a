"""The Mamba-2 model itself: its config and parameter counts, the modules, and the SSD scan in PyTorch.
Knows nothing of quantization, file formats or training."""
