"""``make bench``: offload against the seed's wire approach, the bottleneck bound, the codec and
server scaling (see ``bench/run.py``). Benchmark-only code: it may use ``pickle`` (the seed's
approach, reimplemented to compare against), the ``offload`` package never does."""
