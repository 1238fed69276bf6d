"""``python -m parallelnn ...`` is the same as the ``parallelnn`` console script."""

from parallelnn.cli import main

raise SystemExit(main())
