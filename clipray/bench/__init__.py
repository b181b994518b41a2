"""Benchmarks behind `clipray bench <name>`: each module has `main(argv)` and prints its figures.

`data` (decode pipeline), `model` (per-clip forward / forward+backward time of every head),
`train`, `serve`. Results and the exact commands are kept in docs/benchmarks.md.
"""
