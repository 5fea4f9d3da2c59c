"""runbook's benchmark suite: engine overhead against the plain-Fabric SSH floor, and scale without SSH.

Run it with ``python -m benchmarks`` (or ``make bench``); ``python -m benchmarks --help`` lists the
options. Figures are medians of alternating repetitions; tests never assert on them.
"""
