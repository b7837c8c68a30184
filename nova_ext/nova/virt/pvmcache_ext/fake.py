"""``compute_driver = pvmcache_ext.fake.FakeImageCacheDriver``: see pvmcache_async.fake_driver."""

from pvmcache_async.fake_driver import FakeImageCacheDriver

__all__ = ["FakeImageCacheDriver"]
