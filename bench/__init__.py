"""Benchmarks (``make bench``, ``make bench-scheduler``): measure, never assert.

``make bench`` (``bench/run.py``): offload against the seed's wire approach, the bottleneck bound,
the window, the codec and server scaling. Benchmark-only code may use ``pickle`` (the seed's
approach, reimplemented to compare against); the ``offload`` package never does.
"""
