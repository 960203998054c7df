"""``python -m loraplace`` runs the command line (same as the ``loraplace`` script)."""

import sys

from .cli import main

sys.exit(main())
