"""``compute_driver = pvmcache_ext.fake.FakeImageCacheDriver``: pvmcache_async.nova.fake_driver."""

from pvmcache_async.nova.fake_driver import FakeImageCacheDriver

__all__ = ["FakeImageCacheDriver"]
