"""Toy-world base models for the quality benchmark; see README.md."""
