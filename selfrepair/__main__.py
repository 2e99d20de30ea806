"""``python -m selfrepair ...`` is the ``selfrepair`` command."""

import sys

from .cli import main

sys.exit(main())
