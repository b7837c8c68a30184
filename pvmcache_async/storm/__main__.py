"""``python -m pvmcache_async.storm``: run one storm job (JSON on stdin, JSON on stdout)."""

from .worker import main

raise SystemExit(main())
