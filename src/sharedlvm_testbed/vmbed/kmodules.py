"""Kernel modules for the guests: dependency order from ``modules.dep``, and a small
module tree holding only what the guests load.

The kernel .deb carries no ``modules.dep`` (Debian runs depmod in its postinst) and
this machine has no kmod, so :func:`depmod` runs the ``kmod`` binary unpacked from
its .deb under the name ``depmod`` (kmod picks its personality from argv[0]; a
symlink gives the name, since the Runner takes argv lists only). Dependencies are then
read from ``modules.dep`` here, not by modprobe, so busybox ``insmod`` can load the
boot modules from the initramfs before any ``/usr`` exists.

Keeping the whole module tree in the guest layer costs ~400 MB (TESTBED-NOTES);
:func:`copy_tree` copies only the closure of the modules the guests load.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from sharedlvm.command import Runner
from sharedlvm.errors import CommandError

from .errors import ImageBuildError

# Files depmod and modprobe read besides the .ko files themselves: without
# modules.builtin, "modprobe dm_mod" fails on a kernel where something is built in.
_INDEX_FILES = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


def module_name(path: str) -> str:
    """``kernel/drivers/md/dm-mod.ko`` -> ``dm_mod`` (the kernel treats - and _ alike)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def depmod(runner: Runner, kmod_binary: Path, base_dir: Path, kernel_version: str) -> None:
    """Run ``depmod -b base_dir kernel_version`` with the unpacked kmod binary."""
    # kmod reads its personality from the basename of argv[0]: the link must be
    # named exactly "depmod".
    with tempfile.TemporaryDirectory(prefix="vmbed-kmod-") as tools:
        link = Path(tools) / "depmod"
        link.symlink_to(kmod_binary.resolve())
        try:
            runner.run([str(link), "-b", str(base_dir), kernel_version])
        except CommandError as exc:
            raise ImageBuildError(f"depmod failed: {exc.last_line()}") from exc


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` text -> {module path: [paths it depends on]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path.strip()] = rest.split()
    return deps


def load_order(deps: Mapping[str, list[str]], names: Iterable[str],
               builtin: Iterable[str] = ()) -> list[str]:
    """Module paths to insmod, dependencies first, for the given module names.

    Names of built-in modules are skipped; an unknown name is an error (a typo in a
    module list should not boot a guest without dm_mod).
    """
    by_name = {module_name(path): path for path in deps}
    builtin_names = {module_name(path) for path in builtin}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin_names:
            continue
        if key not in by_name:
            raise ImageBuildError(f"kernel module {name} not found in modules.dep")
        visit(by_name[key])
    return order


def read_tree(modules_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """(dependencies, built-in module paths) of a depmod'ed ``lib/modules/<ver>``."""
    try:
        deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    except FileNotFoundError as exc:
        raise ImageBuildError(f"no modules.dep in {modules_dir}; run depmod first") from exc
    builtin_file = modules_dir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    return deps, builtin


def copy_tree(src_modules_dir: Path, dst_modules_dir: Path, paths: Iterable[str]) -> None:
    """Copy the given module files and the index inputs into a new module tree."""
    dst_modules_dir.mkdir(parents=True, exist_ok=True)
    for name in _INDEX_FILES:
        if (src_modules_dir / name).exists():
            shutil.copy2(src_modules_dir / name, dst_modules_dir / name)
    for rel in paths:
        target = dst_modules_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_modules_dir / rel, target)
