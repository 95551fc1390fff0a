"""Ternary quantization: pure quant math (ternary.py), the QAT module and `quantize_` (qat.py),
zero-ratio monitoring and the collapse detector (monitor.py)."""
