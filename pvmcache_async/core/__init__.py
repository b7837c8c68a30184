"""The cache's own logic: the miss path, per-image locks, the index, room, eviction."""
