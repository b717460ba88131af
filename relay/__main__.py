"""``python -m relay serve`` is the same as ``relay serve``."""

from .cli import main

raise SystemExit(main())
