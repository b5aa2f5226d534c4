"""``python -m workers``: the same as the ``prefix-worker`` command."""

from workers.cli import main

raise SystemExit(main())
