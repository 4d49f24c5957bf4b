"""Failpoints: crash the process at a named point, for tests of partial operations.

Set ``SHAREDLVM_FAILPOINT=<name>`` in a daemon's environment and the daemon exits with
status 99 (as abruptly as a SIGKILL: no cleanup, no reply) when it reaches that point.
Used by the tests that kill the manager between executing a request and replying.
Unset in production, where every failpoint is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import logging
import os

ENV = "SHAREDLVM_FAILPOINT"


def failpoint(name: str) -> None:
    """``SHAREDLVM_FAILPOINT=name`` fires every time; ``name:/path`` fires once per
    path (the file is created when it fires), so a restarted daemon or the next
    manager gets past it."""
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
