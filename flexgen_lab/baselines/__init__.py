"""Baseline systems, run on the engine's prompts and weights: hf (transformers' generate)."""
