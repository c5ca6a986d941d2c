"""`python -m fastinfer ...` is the `fastinfer` command."""

import sys

from fastinfer.cli import main

sys.exit(main())
