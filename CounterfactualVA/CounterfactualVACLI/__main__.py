"""`python -m CounterfactualVACLI <command> ...` (what the Slicer modules run in a subprocess)."""

import sys

from .cli import main

sys.exit(main())
