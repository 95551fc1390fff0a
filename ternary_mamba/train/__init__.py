"""Training: data packing, the shared training loop, and the pretrain / QAT+KD objectives."""
