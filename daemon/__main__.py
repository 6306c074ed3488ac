"""``python -m daemon`` is the ``cdm`` command."""

import sys

from daemon.cli import main

sys.exit(main())
