"""Reporters render Reports and collected statistics; they compute nothing of their own."""
