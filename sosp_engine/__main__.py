"""Entry point of `python -m sosp_engine`."""
import sys

from .cli import main

sys.exit(main())
