"""Fetch and unpack Debian packages without installing them.

The guest kernel, busybox, kmod and udev come from the Debian archive the machine
already uses: ``apt-get download`` puts the .deb in a directory we own and
``dpkg-deb -x`` unpacks it there, so nothing is installed into the machine. The only
package this module installs is qemu itself (:func:`ensure_host_packages`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sharedlvm.command import Runner
from sharedlvm.errors import CommandError

from .errors import HostUnsupported, ImageBuildError

# The packages the machine needs to run guests. qemu-system-x86 is the only one the
# bed installs; lvm2 and sanlock are already there (the guests run the machine's own).
HOST_PACKAGES = ("qemu-system-x86",)
QEMU_BINARY = "qemu-system-x86_64"

# apt-get download of a kernel is ~70 MB; the archive mirror is fast but not instant.
DOWNLOAD_TIMEOUT = 600.0
INSTALL_TIMEOUT = 900.0


def ensure_host_packages(runner: Runner) -> str:
    """Install qemu with apt-get unless it is on PATH; return the qemu binary path.

    Raises :class:`HostUnsupported` when qemu is missing and cannot be installed
    (no apt, no network): the caller skips rather than fails.
    """
    found = shutil.which(QEMU_BINARY)
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise HostUnsupported(f"{QEMU_BINARY} is missing and there is no apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *HOST_PACKAGES]
    try:
        runner.run(argv, env=env, timeout=INSTALL_TIMEOUT)
    except CommandError as exc:
        raise HostUnsupported(f"cannot install {' '.join(HOST_PACKAGES)}: "
                              f"{exc.last_line()}") from exc
    found = shutil.which(QEMU_BINARY)
    if not found:
        raise HostUnsupported(f"{QEMU_BINARY} not on PATH after installing")
    return found


def installed_version(runner: Runner, package: str) -> str:
    """The version of an installed package (for version-matched udev)."""
    try:
        return runner.run(["dpkg-query", "-W", "-f", "${Version}", package]).out.strip()
    except CommandError as exc:
        raise ImageBuildError(f"package {package} is not installed") from exc


def kernel_package(runner: Runner) -> str:
    """The package ``linux-image-amd64`` depends on, e.g. ``linux-image-6.1.0-56-amd64``.

    Read from ``apt-cache depends`` so the guest kernel follows the archive without a
    pinned version in the code.
    """
    out = runner.run(["apt-cache", "depends", "linux-image-amd64"]).out
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise ImageBuildError("cannot find the kernel package linux-image-amd64 depends on")


def policy(runner: Runner, packages: list[str]) -> dict[str, tuple[str | None, list[str]]]:
    """{package: (candidate version or None, all versions the archive offers)}.

    One ``apt-cache policy`` call for all packages: each apt-cache run costs ~0.8 s
    here, and the image cache check makes this call on every bed start.
    """
    out = runner.run(["apt-cache", "policy", *packages]).out
    result: dict[str, tuple[str | None, list[str]]] = {}
    name: str | None = None
    candidate: str | None = None
    versions: list[str] = []
    for line in [*out.splitlines(), "end-of-output:"]:
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            if name is not None:
                result[name] = (candidate, versions)
            name, candidate, versions = line.rstrip()[:-1], None, []
            continue
        text = line.strip()
        if text.startswith("Candidate:"):
            value = text.partition(":")[2].strip()
            candidate = None if value in ("", "(none)") else value
        elif text.startswith("*** ") or (text and len(line) - len(line.lstrip()) == 5):
            # Version table rows: "     252.39-1~deb12u2 500", the installed one as
            # " *** 252.38-1~deb12u1 100"; their sources are indented deeper.
            versions.append(text.removeprefix("*** ").split()[0])
    return result


def download(runner: Runner, spec: str, debs_dir: Path) -> Path:
    """``apt-get download spec`` into debs_dir (cached); return the .deb path.

    spec is ``name`` or ``name=version``. A .deb already in debs_dir is reused, so a
    second build needs no network.
    """
    name, _, version = spec.partition("=")
    debs_dir.mkdir(parents=True, exist_ok=True)
    existing = _find_deb(debs_dir, name, version)
    if existing:
        return existing
    try:
        # apt-get download writes into the current directory and has no option for
        # another one; env -C changes it for the child only (no os.chdir in our
        # process, which would race with other threads).
        runner.run(["env", "-C", str(debs_dir), "apt-get", "download", "-q", spec],
                   timeout=DOWNLOAD_TIMEOUT)
    except CommandError as exc:
        raise ImageBuildError(f"apt-get download {spec} failed: {exc.last_line()}") from exc
    found = _find_deb(debs_dir, name, version)
    if not found:
        raise ImageBuildError(f"apt-get download {spec} left no .deb in {debs_dir}")
    return found


def _find_deb(debs_dir: Path, name: str, version: str) -> Path | None:
    # Debian file names escape ":" of an epoch as %3a.
    for deb in sorted(debs_dir.glob(f"{name}_*.deb")):
        deb_version = deb.name.split("_")[1].replace("%3a", ":")
        if not version or deb_version == version:
            return deb
    return None


def extract(runner: Runner, deb: Path, target: Path) -> None:
    """Unpack a .deb's files (not its scripts) into target."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        runner.run(["dpkg-deb", "-x", str(deb), str(target)], timeout=DOWNLOAD_TIMEOUT)
    except CommandError as exc:
        raise ImageBuildError(f"dpkg-deb -x {deb.name} failed: {exc.last_line()}") from exc
