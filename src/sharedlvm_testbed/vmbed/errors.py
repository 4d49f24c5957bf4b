"""Errors of the qemu test bed, all under the project's :class:`sharedlvm.errors.Error`.

    Error
    └── VmBedError             the qemu test bed failed
        ├── HostUnsupported    this machine cannot run guests (no qemu, no apt, ...)
        ├── ImageBuildError    building the guest kernel/initramfs/module layer failed
        ├── GuestBootError     a guest did not come up (its console log is named)
        └── GuestAgentError    the in-guest agent did not answer or broke the protocol
    CommandError
    └── GuestCommandError      a command run in a guest failed (check=True)

``HostUnsupported`` is the one tests turn into ``pytest.skip``: it means "cannot run
here", every other error means "ran and broke".
"""

from __future__ import annotations

from collections.abc import Sequence

from sharedlvm.errors import CommandError, Error


class VmBedError(Error):
    pass


class HostUnsupported(VmBedError):
    pass


class ImageBuildError(VmBedError):
    pass


class GuestBootError(VmBedError):
    pass


class GuestAgentError(VmBedError):
    pass


class GuestCommandError(CommandError):
    """A command run inside a guest failed; like CommandError, naming the guest."""

    def __init__(self, guest: str, argv: Sequence[str], rc: int, out: str, err: str) -> None:
        super().__init__(argv, rc, out, err)
        self.guest = guest

    def __str__(self) -> str:
        return (f"command {self.argv[0]} failed in guest {self.guest} "
                f"(rc={self.rc}): {self.last_line()}")
