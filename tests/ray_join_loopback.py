"""``python -m tests.ray_join_loopback start --address 127.0.0.1:PORT ...``: ``ray start`` for a second node of a
loopback-only cluster on one machine (the two-node tests).

Every Ray process of these tests runs with Ray's single-machine switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
see vitpose/raycluster.py), the only way Ray keeps all its servers on 127.0.0.1. With the switch, ``ray start``
refuses to join a head ("multi-node clusters are not supported on Windows and OSX"); on Linux that refusal is
the only thing in the way, so here it alone is lifted: the CLI's check sees clusters enabled, while the node IP
stays the loopback address and the processes this starts inherit the switch.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "run with the loopback switch set"
    import ray._private.ray_constants as ray_constants
    from ray._private import services
    from ray.scripts import scripts

    # Resolved before the check, with the switch still on: 127.0.0.1 stays 127.0.0.1.
    services.resolve_ip_for_localhost = lambda host: host
    ray_constants.ENABLE_RAY_CLUSTER = True
    sys.exit(scripts.main())
