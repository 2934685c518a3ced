"""``python -m tokensparse``: the command line interface."""
from .cli import main

raise SystemExit(main())
