"""fastcse benchmarks: one module per op (``python -m bench.bench_infonce``), rows appended to
``bench/results/*.csv``, plots drawn from those CSVs with ``--plot``."""
