"""A guest that only writes: the vmbed kernel booting a tiny ``/init`` that writes a
blob over its virtio disk, for tests of VMs whose disks sharedlvm grows.

The guest's initramfs is the bed's own (busybox, the boot modules: virtio_pci,
virtio_blk) with a second archive appended, which the kernel unpacks over the first:
its ``/init`` and the blob to write. ``/init`` loads the boot modules, writes the blob
``count`` times back to back from offset 0 of ``/dev/vda`` (each copy one ``dd``
through the guest's page cache, ``conv=fsync``: the writes reach the disk before the
next copy starts, as a guest's bursts do), prints ``WRITER-DONE`` or
``WRITE-FAILED N`` on the console and powers off. qemu's drive has
``werror=enospc``: a write past the LV's end pauses the guest instead of failing it,
and the guest goes on once qemu is resumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO

from .image import GuestImage
from .qemu import accel_args

BLOB = "blob"
DONE = "WRITER-DONE"
FAILED = "WRITE-FAILED"

_INIT = r"""#!/bb/busybox sh
bb=/bb/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for ko in $($bb cat /boot-modules/order); do $bb insmod /boot-modules/$ko 2>/dev/null; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do $bb sleep 0.1; n=$((n + 1)); done
mib=$(($($bb stat -c %s /@BLOB@) / 1048576))
echo "writer: writing $mib MiB @COUNT@ times after $($bb cut -d' ' -f1 /proc/uptime) s"
i=0
while [ $i -lt @COUNT@ ]; do
    $bb dd if=/@BLOB@ of=/dev/vda bs=4M seek=$((i * mib / 4)) conv=notrunc,fsync 2>/dev/null \
        || echo "@FAILED@ $i"
    i=$((i + 1))
done
$bb sync
echo "@DONE@ after $($bb cut -d' ' -f1 /proc/uptime) s"
$bb poweroff -f
"""


def writer_initrd(image: GuestImage, blob: Path, count: int, output: Path) -> None:
    """The bed's initramfs with the writer's /init and ``blob`` appended (whole 4 MiB
    blocks: the guest writes it with ``dd bs=4M``)."""
    size = blob.stat().st_size
    if not size or size % (4 << 20) or size >= 1 << 32:
        raise ValueError(f"the blob must be a whole number of 4 MiB blocks under 4 GiB, "
                         f"not {size} bytes")
    init = (_INIT.replace("@BLOB@", BLOB).replace("@COUNT@", str(count))
            .replace("@DONE@", DONE).replace("@FAILED@", FAILED))
    with output.open("wb") as out:
        with image.initramfs.open("rb") as f:
            shutil.copyfileobj(f, out)
        out.write(b"\0" * (-out.tell() % 4))  # each archive starts 4-byte aligned
        _newc_entry(out, "init", init.encode(), 0o100755)
        _newc_entry(out, BLOB, blob.read_bytes(), 0o100644)
        _newc_entry(out, "TRAILER!!!", b"", 0)


def _newc_entry(out: BinaryIO, name: str, data: bytes, mode: int) -> None:
    """One file of a newc cpio archive (the format the kernel unpacks)."""
    encoded = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def writer_qemu_args(image: GuestImage, initrd: Path, console: Path,
                     memory_mib: int = 384) -> list[str]:
    """qemu options of the writer guest, without the binary; its disk is ``{0}`` (the
    device ``sharedlvm run`` gives), a qcow2 image, ``werror=enospc``."""
    return [
        "-machine", "q35", *accel_args(), "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=1 loglevel=4 mitigations=off",
        "-serial", f"file:{console}",
        "-drive", "file={0},format=qcow2,if=none,id=vda,cache=none,aio=native,"
                  "werror=enospc,rerror=stop",
        "-device", "virtio-blk-pci,drive=vda",
    ]
