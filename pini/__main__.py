"""``python -m pini`` = the ``pini`` command."""

import sys

from .cli import main

sys.exit(main())
