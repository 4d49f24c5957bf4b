"""Simulated hosts as small qemu guests with a real kernel (device-mapper, softdog).

The second backend of the test bed: each host is a guest booted from a Debian kernel
and a busybox initramfs, running the machine's own ``/usr`` over 9p, all guests
sharing one LUN file as a virtio disk. See TESTBED-NOTES for the measurements behind
the choices.

    image = build_image(Runner())                  # cached, seconds after first time
    with GuestBed(2, lun_path, work_dir, image=image) as bed:
        rc, out, err = bed[0].run(["lvs"], check=False)

:mod:`sharedlvm_testbed.vmbed.fencing` runs watchdog self-fencing on a bed (storage
loss and power loss of a lease holder); ``python -m sharedlvm_testbed.demo_vm`` shows
it. :mod:`sharedlvm_testbed.vmbed.vmsim` is the ``vm`` backend of ``sharedlvm-sim``.
"""

from .bed import GuestBed
from .debs import ensure_host_packages
from .errors import (
    GuestAgentError,
    GuestBootError,
    GuestCommandError,
    HostUnsupported,
    ImageBuildError,
    VmBedError,
)
from .guest import Guest, GuestResult
from .image import DEFAULT_CACHE_DIR, GuestImage, build_image

__all__ = [
    "DEFAULT_CACHE_DIR",
    "Guest",
    "GuestAgentError",
    "GuestBed",
    "GuestBootError",
    "GuestCommandError",
    "GuestImage",
    "GuestResult",
    "HostUnsupported",
    "ImageBuildError",
    "VmBedError",
    "build_image",
    "ensure_host_packages",
]
