"""``python -m selfrepair ...`` is the ``selfrepair`` command."""

import sys

from .study.cli import main

sys.exit(main())
