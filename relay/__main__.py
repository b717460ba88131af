"""``python -m relay serve`` is the same as ``relay serve``."""

from relay.cli import main

raise SystemExit(main())
