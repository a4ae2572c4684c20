"""`python -m hematovision classify PATH... [--csv OUT]`: see hematovision.cli."""

import sys

from hematovision.cli import main

sys.exit(main())
