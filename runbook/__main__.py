"""`python -m runbook` runs the CLI."""

import sys

from runbook.cli import main

sys.exit(main())
