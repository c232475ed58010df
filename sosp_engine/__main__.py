"""Entry point of `python -m sosp_engine`."""

import sys

from .cli.main import main

sys.exit(main())
