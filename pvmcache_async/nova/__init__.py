"""nova-compute integration: the [pvmcache] options, the loop thread, the fake driver."""
