"""Evaluation on the paper's benchmarks, as a client of the public API: `python -m ego.evaluate --help`.

datasets (loaders of the published layouts, and a synthetic fixture), scoring (pure functions), judge (open
answers), runner (cached concepts, resumable logs, data-parallel shares, reports). docs/evaluation.md has the
commands for each of the paper's tables.
"""
