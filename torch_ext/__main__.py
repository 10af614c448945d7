"""``python -m fusedact``: the activation lab's command line, the same as ``fusedact`` (see ``--help``)."""

import sys

from .lab.cli import main

sys.exit(main())
