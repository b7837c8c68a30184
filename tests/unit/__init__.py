"""The unit layer: the core on the memory VG and a scripted Glance; no nova, no servers, no
subprocesses. Runs first (``testpaths``) and in seconds."""

from . import layer  # noqa: F401 - first of all: it notes what nova was imported before
