import sys

from pvmcache_async.cli.main import main

sys.exit(main())
