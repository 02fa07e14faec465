"""Evaluation: validation perplexity on any data config, and downstream tasks through lm-evaluation-harness."""
