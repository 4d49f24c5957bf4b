"""Errors of the qemu test bed, all under the project's :class:`sharedlvm.errors.Error`.

    Error
    └── VmBedError             the qemu test bed failed
        ├── HostUnsupported    this machine cannot run guests (no qemu, no apt, ...)
        ├── ImageBuildError    building the guest kernel/initramfs/module layer failed
        ├── GuestBootError     a guest did not come up (its console log is named)
        └── GuestAgentError    the in-guest agent did not answer or broke the protocol

``HostUnsupported`` is the one tests turn into ``pytest.skip``: it means "cannot run
here", every other error means "ran and broke".
"""

from __future__ import annotations

from ..errors import Error


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
