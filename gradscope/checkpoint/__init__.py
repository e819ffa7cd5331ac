"""Checkpoint inspection: safe loading of weights, and weight-only analysis."""
