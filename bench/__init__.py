"""Chorus benchmarks: fan-out throughput, latency, memory and replay against a naive baseline.

Run with `make bench` (or `python -m bench --quick` for a smoke run); see bench/README.md.
Benchmarks are not tests: they print a table and write JSON, they assert nothing.
"""
