"""N guests on one LUN file, booted in parallel and always torn down together.

This is the qemu backend of the simulated-hosts test bed: where ``sim up`` gives
each host its own LVM config dir on the machine's kernel, a :class:`GuestBed` gives
each host its own kernel (device-mapper, softdog, wdmd), all on one shared LUN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from sharedlvm.command import Runner

from .errors import VmBedError
from .guest import DEFAULT_BOOT_TIMEOUT, Guest
from .image import GuestImage, build_image
from .qemu import DEFAULT_MEMORY_MIB

log = logging.getLogger(__name__)


class GuestBed:
    """Guests ``host1..hostN``, each with its own directory under work_dir.

    Not started by the constructor: use ``with GuestBed(...) as bed`` or
    :meth:`start`/:meth:`stop`. :meth:`start` leaves nothing running if any guest
    fails to boot; :meth:`stop` tries every guest even if some fail, then raises
    the first error.
    """

    def __init__(self, count: int, lun_path: Path, work_dir: Path, *,
                 image: GuestImage | None = None, runner: Runner | None = None,
                 share_dir: Path | None = None, udev: bool = False,
                 memory_mib: int = DEFAULT_MEMORY_MIB,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        if count < 1:
            raise ValueError(f"a bed needs at least one guest, not {count}")
        self.count = count
        self.lun_path = lun_path
        self.work_dir = work_dir
        self.runner = runner or Runner()
        self._image = image
        self.share_dir = share_dir
        self.udev = udev
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.guests: list[Guest] = []
        self.boot_seconds: float | None = None

    def start(self) -> None:
        """Build (or reuse) the image, then boot all guests in parallel."""
        if self.guests:
            raise VmBedError("the bed is already started")
        image = self._image or build_image(self.runner)
        self.guests = [
            Guest(f"host{i}", image, self.lun_path, self.work_dir / f"host{i}",
                  runner=self.runner, share_dir=self.share_dir, udev=self.udev,
                  memory_mib=self.memory_mib, boot_timeout=self.boot_timeout)
            for i in range(1, self.count + 1)
        ]
        started = time.monotonic()
        errors = self._each(Guest.start)
        if errors:
            self.power_off()
            raise errors[0]
        self.boot_seconds = time.monotonic() - started
        log.info("%d guests booted in %.1f s", self.count, self.boot_seconds)

    def stop(self) -> None:
        """Clean shutdown of every guest (each falls back to power off)."""
        errors = self._each(Guest.stop)
        self.guests = []
        if errors:
            raise errors[0]

    def power_off(self) -> None:
        """Kill every guest's qemu by pid, without shutting down."""
        errors = self._each(Guest.power_off)
        self.guests = []
        if errors:
            raise errors[0]

    def _each(self, action: Callable[[Guest], None]) -> list[BaseException]:
        """Apply Guest.start/stop/power_off to all guests in parallel; collect errors."""
        return run_each([partial(action, guest) for guest in self.guests])

    def __enter__(self) -> GuestBed:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __getitem__(self, index: int) -> Guest:
        return self.guests[index]



def run_each(actions: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Run actions in parallel, each to its end; the errors they raised, in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(actions))) as pool:
        futures = [pool.submit(action) for action in actions]
    return [exc for f in futures if (exc := f.exception()) is not None]
