"""Evaluation of pruned models: perplexity, zero-shot accuracy through lm-eval, speed."""
