"""Benchmarks (``make bench``, ``make bench-scheduler``): measure, never assert."""
