"""`python -m benchmarks`: run the benchmark suite, print the table, write the JSON."""

import sys

from benchmarks.cluster_bench import main as cluster_main
from benchmarks.serve_bench import main as serve_main
from benchmarks.suite import main

code = main()
code = code or serve_main([])   # then `runbook serve`: 1,000 alerts, 90% duplicates, 50 hosts
sys.exit(code or cluster_main([]))   # then `--cluster`: 30 and 100 hosts x 10 steps on Dask workers
