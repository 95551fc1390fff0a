"""Evaluation: zero-shot tasks (prompts identical to lm-eval's standard task YAMLs), batched
log-likelihood scoring, perplexity on text, and the lm-eval model adapter."""
