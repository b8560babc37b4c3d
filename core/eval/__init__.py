"""Evaluation of models: scoring, held-out loss, multiple choice, memorization, sampling."""
