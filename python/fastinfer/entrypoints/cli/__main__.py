"""``python -m fastinfer.entrypoints.cli ...`` is the ``fastinfer`` command."""

import sys

from fastinfer.entrypoints.cli.main import main

sys.exit(main())
