"""``python -m bwrf_ext.train``: the same as the ``bwrf-train`` console script."""

from bwrf_ext.train.cli import main

raise SystemExit(main())
