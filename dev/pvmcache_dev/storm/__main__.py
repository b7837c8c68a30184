"""``python -m pvmcache_dev.storm``: run one storm job (JSON on stdin, JSON on stdout)."""

from .worker import main

raise SystemExit(main())
