"""Collected statistics: host-side records, on-device reductions, and the bounded history."""
