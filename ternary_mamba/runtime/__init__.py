"""Inference: packed ternary linears, smaller heads, the whole-model C decode step, generation, in-memory
conversion of a fake-quant student to packed weights, and process memory settings."""
