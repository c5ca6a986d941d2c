"""`python -m fastinfer ...` is the `fastinfer` command."""

import sys

from fastinfer.entrypoints.cli.main import main

sys.exit(main())
