"""`python -m benchmarks`: run the benchmark suite, print the table, write the JSON."""

import sys

from benchmarks.serve_bench import main as serve_main
from benchmarks.suite import main

code = main()
sys.exit(code or serve_main([]))   # then `runbook serve`: 1,000 alerts, 90% duplicates, 50 hosts
