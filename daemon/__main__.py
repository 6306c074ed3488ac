"""``python -m daemon`` is the ``cdm`` command too (an entry point: the one daemon module that imports cli)."""

import sys

from cli import main

sys.exit(main())
