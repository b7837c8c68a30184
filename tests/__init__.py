"""The test suite; this runs before any conftest or test module is imported.

nova runs here in native threading mode, as nova-compute does with ``concurrency_backend =
threading``: nova's functional test package applies the mode when it is imported, and that
must happen before anything imports ``nova.conf`` (which would pull in eventlet). nova then
forbids importing eventlet in this process, so a test that needs eventlet runs it in a child
process; child processes inherit the setting.
"""

import os

os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
import nova.tests.functional  # noqa: F401
