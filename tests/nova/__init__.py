"""Tests that run nova's own code in this process (its functional harness, its compute driver
API): nova in native threading mode, as nova-compute runs with ``concurrency_backend =
threading``. nova's functional test package applies the mode when it is imported, which must
happen before anything imports ``nova.conf`` (that would pull in eventlet); this package is
imported before its test modules, and no test outside it imports nova. nova then forbids
importing eventlet in this process, so a test that needs eventlet runs it in a child process.
pypowervm imports eventlet where it can: the layers run in ``testpaths``' order, this one before
``integration/`` (whose PowerVM tests load pypowervm).
"""

import sys

if "eventlet" in sys.modules:
    raise ImportError(
        "eventlet was imported before nova's tests (pypowervm does): "
        "run tests/nova before tests/integration, as testpaths does"
    )
import nova.tests.functional  # noqa: F401
