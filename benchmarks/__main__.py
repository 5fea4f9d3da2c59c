"""`python -m benchmarks`: run the benchmark suite, print the table, write the JSON."""

import sys

from benchmarks.suite import main

sys.exit(main())
