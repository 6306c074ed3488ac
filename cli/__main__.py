"""``python -m cli`` is the ``cdm`` command."""

import sys

from cli import main

sys.exit(main())
