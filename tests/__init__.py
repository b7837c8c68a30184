"""The test suite; this runs before any conftest or test module is imported.

Layers: ``tests/unit`` needs neither nova nor a server nor a subprocess, and imports no nova
module (``tests/unit/test_layer.py`` checks it); pytest runs it first (``testpaths``).

nova runs here in native threading mode, as nova-compute does with ``concurrency_backend =
threading``: nova's functional test package applies the mode when it is imported, and that
must happen before anything imports ``nova.conf`` (which would pull in eventlet). So
``tests/conftest.py`` imports it before it collects the first test module outside
``tests/unit``. nova then forbids importing eventlet in this process, so a test that needs
eventlet runs it in a child process; child processes inherit the setting below.
"""

import os

os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
