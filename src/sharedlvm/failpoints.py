"""Failpoints: crash or pause the process at a named point, for tests of partial
operations and races.

``SHAREDLVM_FAILPOINT=<name>`` in a daemon's environment makes it exit with status 99
(as abruptly as a SIGKILL: no cleanup, no reply) when it reaches that point;
``<name>:/path`` fires once per path (the file is created when it fires), so a
restarted daemon or the next manager gets past it. ``SHAREDLVM_PAUSEPOINT=<name>:<s>``
makes it sleep ``s`` seconds there instead, to open a race window a test can use.
Unset in production, where every failpoint is two dictionary lookups and nothing
else.
"""

from __future__ import annotations

import logging
import os
import time

ENV = "SHAREDLVM_FAILPOINT"
PAUSE_ENV = "SHAREDLVM_PAUSEPOINT"


def failpoint(name: str) -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        point, _, seconds = pause.partition(":")
        if point == name:
            logging.getLogger(__name__).warning("pausepoint %s: sleeping %s s", name, seconds)
            time.sleep(float(seconds or 1))
    value = os.environ.get(ENV)
    if not value:
        return
    point, _, once = value.partition(":")
    if point != name:
        return
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    logging.getLogger(__name__).error("failpoint %s: exiting now", name)
    logging.shutdown()
    os._exit(99)
