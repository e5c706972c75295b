"""`python -m corinfomax`: the same as the `corinfomax` command."""

import sys

from corinfomax.cli import main

sys.exit(main())
