"""``python -m gsmsr ...`` is the ``gsmsr`` command."""

import sys

from gsmsr.cli import main

sys.exit(main())
