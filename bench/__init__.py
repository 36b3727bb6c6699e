"""The cost of personalization: `python -m bench` (see bench/harness.py and bench/RESULTS.md)."""

from .harness import main

__all__ = ["main"]
