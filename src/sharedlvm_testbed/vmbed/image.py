"""Build, once, the files a guest boots from, cached under a cache directory.

A :class:`GuestImage` is a Debian kernel, an initramfs (busybox ``/init`` + the
agent + the modules needed to reach the 9p shares) and a read-only *layer* directory
overlaid on the guest's ``/usr`` (only the kernel modules the guests load, kmod for
``modprobe``, and version-matched udev when the archive has it).

Everything comes from the machine's apt sources with ``apt-get download`` and
``dpkg-deb -x``; nothing is installed into the machine. The cache key covers the
package versions and the sources of ``/init`` and the agent, so editing either
rebuilds. Building takes seconds once the ~70 MB kernel .deb is downloaded; the
.debs stay in ``<cache>/debs`` for the next build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sharedlvm.command import Runner

from . import agent, debs, initramfs, kmodules
from .debs import ensure_host_packages
from .errors import ImageBuildError

__all__ = ["DEFAULT_CACHE_DIR", "GuestImage", "build_image", "ensure_host_packages"]

# Shared by every bed on the machine: the kernel download is the slow part.
DEFAULT_CACHE_DIR = Path("/var/cache/sharedlvm/vmbed")
CACHE_DIR_ENV = "SHAREDLVM_VMBED_CACHE"

# Loaded with busybox insmod from the initramfs: needed to mount the 9p shares and
# the overlay, to see the LUN (virtio_blk) and the agent port (virtio_console).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_blk",
                "virtio_console")
# Loaded with modprobe once /usr is up: real activation (device-mapper targets LVM
# uses), the softdog watchdog that wdmd arms, and loop for file-backed test devices.
GUEST_MODULES = ("dm_mod", "dm_snapshot", "dm_mirror", "dm_zero", "softdog", "loop")

# kmod personalities the layer provides as symlinks to the kmod binary.
_KMOD_TOOLS = ("modprobe", "depmod", "insmod", "rmmod", "lsmod", "modinfo")

_MANIFEST = "manifest.json"
# Start of an xz stream: Debian compresses its x86 kernels with xz.
_XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class GuestImage:
    """What a guest boots from. All paths are inside the cache directory."""

    directory: Path
    kernel_version: str
    has_udev: bool
    kernel_file: str = "vmlinuz"

    @property
    def kernel(self) -> Path:
        """What qemu's -kernel gets: an ELF vmlinux when PVH boot works, or vmlinuz."""
        return self.directory / self.kernel_file

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @property
    def layer(self) -> Path:
        """Read-only directory overlaid on the guest's /usr."""
        return self.directory / "layer"


def default_cache_dir() -> Path:
    """``$SHAREDLVM_VMBED_CACHE`` if set, else :data:`DEFAULT_CACHE_DIR`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def build_image(runner: Runner, cache_dir: Path | None = None, *,
                with_udev: bool = True) -> GuestImage:
    """Return the cached image for the current archive versions, building it if needed.

    Safe to call from concurrent processes: builds are serialized by a lock file
    and published with an atomic rename.
    """
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = _package_specs(runner, with_udev)
    kernel_version = specs["kernel"].partition("=")[0].removeprefix("linux-image-")
    directory = cache_dir / f"{kernel_version}-{_cache_key(specs)}"
    with _locked(cache_dir / ".lock"):
        if not (directory / _MANIFEST).exists():
            _build(runner, cache_dir, directory, specs, kernel_version)
    manifest = json.loads((directory / _MANIFEST).read_text())
    return GuestImage(directory, manifest["kernel_version"], manifest["has_udev"],
                      manifest["kernel_file"])


def _package_specs(runner: Runner, with_udev: bool) -> dict[str, str]:
    """apt-get download specs (``name=version``) of the packages the image uses."""
    kernel = debs.kernel_package(runner)
    names = {"kernel": kernel, "busybox": "busybox-static", "kmod": "kmod"}
    if with_udev:
        names["udev"] = "udev"
    policy = debs.policy(runner, list(names.values()))
    specs: dict[str, str] = {}
    for key, name in names.items():
        candidate, versions = policy.get(name, (None, []))
        if key == "udev":
            # udevd links the machine's libsystemd-shared: it must be the very same
            # systemd version (TESTBED-NOTES). Without it plain LVM still works.
            systemd = debs.installed_version(runner, "systemd")
            if systemd in versions:
                specs[key] = f"{name}={systemd}"
        elif candidate is None:
            raise ImageBuildError(f"the apt archive has no {name}")
        else:
            specs[key] = f"{name}={candidate}"
    return specs


def _cache_key(specs: dict[str, str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(specs, sort_keys=True).encode())
    digest.update(json.dumps([BOOT_MODULES, GUEST_MODULES]).encode())
    for source in (agent.__file__, initramfs.__file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:12]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(runner: Runner, cache_dir: Path, directory: Path, specs: dict[str, str],
           kernel_version: str) -> None:
    work = cache_dir / f".build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        unpacked = {}
        for key, spec in specs.items():
            deb = debs.download(runner, spec, cache_dir / "debs")
            unpacked[key] = work / key
            debs.extract(runner, deb, unpacked[key])
        image = work / "image"
        image.mkdir()
        kmod = unpacked["kmod"] / "bin" / "kmod"
        src_modules = unpacked["kernel"] / "lib" / "modules" / kernel_version
        kmodules.depmod(runner, kmod, unpacked["kernel"], kernel_version)
        deps, builtin = kmodules.read_tree(src_modules)
        boot_order = kmodules.load_order(deps, BOOT_MODULES, builtin)
        guest_order = kmodules.load_order(deps, GUEST_MODULES, builtin)

        layer = image / "layer"
        kmodules.copy_tree(src_modules, layer / "lib" / "modules" / kernel_version,
                           sorted(set(boot_order + guest_order)))
        _install_kmod(kmod, layer)
        kmodules.depmod(runner, kmod, layer, kernel_version)
        if "udev" in unpacked:
            _install_usr_files(unpacked["udev"], layer)

        initramfs.build(
            runner, work / "initramfs", image / "initramfs.cpio",
            busybox=unpacked["busybox"] / "bin" / "busybox",
            agent=Path(agent.__file__),
            boot_modules=[src_modules / path for path in boot_order],
            guest_modules=GUEST_MODULES,
        )
        kernel_file = _install_kernel(unpacked["kernel"] / "boot", kernel_version, image)
        manifest = {"kernel_version": kernel_version, "has_udev": "udev" in unpacked,
                    "kernel_file": kernel_file,
                    "packages": specs, "boot_modules": boot_order,
                    "guest_modules": guest_order}
        (image / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        image.rename(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install_kernel(boot: Path, kernel_version: str, image: Path) -> str:
    """Put the kernel qemu boots into image/; return its file name.

    Under TCG, decompressing the xz bzImage before the kernel even starts its clock
    took ~5 s per boot (measured: 9.7 s vs 4.3 s from qemu start to a panic at the
    missing root). qemu boots an uncompressed ELF vmlinux directly through the PVH
    entry point when the kernel has CONFIG_PVH, so the image keeps the decompressed
    kernel (~65 MB) when possible, and the bzImage otherwise.
    """
    vmlinuz = boot / f"vmlinuz-{kernel_version}"
    config = boot / f"config-{kernel_version}"
    has_pvh = config.exists() and "CONFIG_PVH=y" in config.read_text().splitlines()
    if has_pvh:
        data = vmlinuz.read_bytes()
        start = data.find(_XZ_MAGIC)
        if start >= 0:
            try:
                elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
            except lzma.LZMAError:
                elf = b""
            if elf.startswith(b"\x7fELF"):
                (image / "vmlinux").write_bytes(elf)
                return "vmlinux"
    shutil.copyfile(vmlinuz, image / "vmlinuz")
    return "vmlinuz"


def _install_kmod(kmod: Path, layer: Path) -> None:
    """kmod at layer/bin (guest /usr/bin) and its tools as relative symlinks."""
    (layer / "bin").mkdir(parents=True, exist_ok=True)
    (layer / "sbin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(kmod, layer / "bin" / "kmod")
    for tool in _KMOD_TOOLS:
        (layer / "sbin" / tool).symlink_to("../bin/kmod")


def _install_usr_files(unpacked: Path, layer: Path) -> None:
    """Copy a package's files into the layer, which the guest sees as /usr.

    Debian 12 .debs still ship /bin, /sbin, /lib; the guest has a merged /usr, so
    both /lib/x and /usr/lib/x land at layer/lib/x. Documentation and /etc are left
    out (the guest's /etc is the machine's).
    """
    for top in ("bin", "sbin", "lib", "lib64"):
        if (unpacked / top).is_dir():
            shutil.copytree(unpacked / top, layer / top, symlinks=True, dirs_exist_ok=True)
    usr = unpacked / "usr"
    for entry in sorted(usr.iterdir()) if usr.is_dir() else []:
        if entry.name != "share":
            shutil.copytree(entry, layer / entry.name, symlinks=True, dirs_exist_ok=True)
