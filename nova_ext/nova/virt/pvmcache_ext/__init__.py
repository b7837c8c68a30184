"""pvmcache_async's drivers in nova's namespace: nova loads ``compute_driver`` only from
``nova.virt``, so ``compute_driver = pvmcache_ext.fake.FakeImageCacheDriver`` finds them here.
Nothing but imports from pvmcache_async lives in this package."""
