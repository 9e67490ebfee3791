"""Inference: cached generation (and, later, export)."""
