"""The test suite, in layers: ``unit/`` (the core on the memory VG and a scripted Glance: no
nova, no server, no subprocess; run first), ``integration/`` (real processes, files, signals,
Glance and Keystone), ``nova/`` (nova's own code drives the cache) and ``cloud/`` (a real nova
cloud on loopback, as root). Nothing at this level imports nova (``unit/test_layer.py``).

Child processes inherit nova's threading mode from the variable below, which nova reads when a
test of ``nova/`` imports it.
"""

import os

os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
