"""The qemu command line of one guest. The only module that knows qemu's flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import initramfs
from .agent import PORT_NAME
from .debs import QEMU_BINARY
from .image import GuestImage

# Per guest: 512 MiB leaves room for LVM and sanlock (40-64 MiB used inside a guest);
# one vCPU, since TCG on a 2-core machine is CPU-bound (TESTBED-NOTES).
DEFAULT_MEMORY_MIB = 512

# panic=1 + -no-reboot: a kernel panic or a softdog reset ends the qemu process, which
# is how the bed sees a fenced host. mitigations=off: nothing to protect inside a
# throw-away guest and it saves TCG time.
_KERNEL_ARGS = "console=ttyS0 panic=1 loglevel=4 mitigations=off"


def has_hardware_kvm() -> bool:
    """True only for a KVM that can run a stock kernel.

    /dev/kvm may be a PVM-only KVM (/sys/module/kvm_pvm) on which ``-accel kvm``
    hangs at boot (TESTBED-NOTES), so look for the Intel/AMD modules, not the node.
    """
    return Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()


def accel_args() -> list[str]:
    if has_hardware_kvm():
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]


@dataclass(frozen=True)
class QemuConfig:
    """Everything that differs between two guests of one bed."""

    name: str
    image: GuestImage
    lun_path: Path
    share_dir: Path
    console_path: Path
    control_socket: Path
    pid_file: Path
    memory_mib: int = DEFAULT_MEMORY_MIB
    udev: bool = False
    sector_size: int = 512  # logical and physical block size of the shared LUN


def _virtfs(path: Path | str, tag: str, readonly: bool) -> list[str]:
    spec = f"local,path={path},mount_tag={tag},security_model=none"
    return ["-virtfs", spec + (",readonly=on" if readonly else "")]


def qemu_argv(config: QemuConfig) -> list[str]:
    """argv that starts the guest daemonized; its pid lands in config.pid_file."""
    append = f"{_KERNEL_ARGS} vmbed.name={config.name} vmbed.udev={int(config.udev)}"
    return [
        QEMU_BINARY,
        "-name", config.name,
        "-machine", "q35",
        *accel_args(),
        "-m", str(config.memory_mib),
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(config.image.kernel),
        "-initrd", str(config.image.initramfs),
        "-append", append,
        "-serial", f"file:{config.console_path}",
        # The shared LUN, as every host of a SAN sees it: no host-side caching and
        # no image locking, so all guests can open it read-write at once.
        "-drive", f"file={config.lun_path},format=raw,if=none,id=san0,cache=none,"
                  "aio=threads,file.locking=off",
        "-device", "virtio-blk-pci,drive=san0,share-rw=on,serial=SAN0,"
                   f"logical_block_size={config.sector_size},"
                   f"physical_block_size={config.sector_size}",
        *_virtfs("/usr", initramfs.TAG_USR, readonly=True),
        *_virtfs("/etc", initramfs.TAG_ETC, readonly=True),
        *_virtfs(config.image.layer, initramfs.TAG_LAYER, readonly=True),
        *_virtfs(config.share_dir, initramfs.TAG_PROJECT, readonly=False),
        "-chardev", f"socket,id=agent0,path={config.control_socket},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={PORT_NAME}",
        "-daemonize", "-pidfile", str(config.pid_file),
    ]
