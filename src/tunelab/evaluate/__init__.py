"""Evaluation: task metrics, log-likelihood multiple-choice benchmarks, perplexity, and the before/after report card."""
