"""`python -m cli ...` = `rerank-fleet ...` (where the console script is not installed)."""

import sys

from cli import main

sys.exit(main())
