"""Fast tests of the qemu bed's pure parts: module dependency order, the agent's
framing, the qemu command line. No qemu, no root."""

from __future__ import annotations

from pathlib import Path

import pytest

import sharedlvm_testbed.vmbed
from sharedlvm_testbed.vmbed import agent, initramfs, kmodules
from sharedlvm_testbed.vmbed.errors import ImageBuildError
from sharedlvm_testbed.vmbed.image import GuestImage
from sharedlvm_testbed.vmbed.qemu import QemuConfig, qemu_argv

MODULES_DEP = """\
kernel/drivers/md/dm-mod.ko:
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-snapshot.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/fs/9p/9p.ko: kernel/fs/fscache/fscache.ko kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet.ko:
"""


def test_module_name_normalizes_dashes() -> None:
    assert kmodules.module_name("kernel/drivers/md/dm-mod.ko") == "dm_mod"
    assert kmodules.module_name("kernel/fs/9p/9p.ko.xz") == "9p"


def test_load_order_puts_dependencies_first_once() -> None:
    deps = kmodules.parse_modules_dep(MODULES_DEP)
    order = kmodules.load_order(deps, ["dm_snapshot", "dm-mod", "9p"])
    assert order.index("kernel/drivers/md/dm-mod.ko") < order.index(
        "kernel/drivers/md/dm-snapshot.ko")
    assert order.index("kernel/fs/netfs/netfs.ko") < order.index("kernel/fs/fscache/fscache.ko")
    assert order[-1] == "kernel/fs/9p/9p.ko"
    assert len(order) == len(set(order))


def test_load_order_skips_builtin_and_rejects_unknown() -> None:
    deps = kmodules.parse_modules_dep(MODULES_DEP)
    assert kmodules.load_order(deps, ["overlay"], builtin=["kernel/fs/overlay.ko"]) == []
    with pytest.raises(ImageBuildError):
        kmodules.load_order(deps, ["no_such_module"])


def test_frames_survive_arbitrary_chunking() -> None:
    messages = [{"id": 1, "op": "ping"}, {"id": 2, "out": "x" * 70000}]
    data = b"".join(agent.encode_frame(m) for m in messages)
    frames = agent.FrameBuffer()
    received = []
    for start in range(0, len(data), 777):
        received += frames.feed(data[start:start + 777])
    assert received == messages


def test_frame_with_absurd_length_is_a_protocol_error() -> None:
    with pytest.raises(agent.ProtocolError):
        agent.FrameBuffer().feed(b"\xff\xff\xff\xff{}")


def test_agent_runs_argv_without_shell() -> None:
    reply = agent.run_command({"argv": ["echo", "a;b", "$HOME"], "timeout": 10})
    assert reply == {"rc": 0, "out": "a;b $HOME\n", "err": "", "timed_out": False}
    missing = agent.run_command({"argv": ["/no/such/binary"], "timeout": 10})
    assert missing["rc"] == 127


def test_agent_times_out_and_kills() -> None:
    reply = agent.run_command({"argv": ["sleep", "10"], "timeout": 0.2})
    assert reply["timed_out"] and reply["rc"] != 0


def test_qemu_argv_shares_the_lun_without_locking(tmp_path: Path) -> None:
    config = QemuConfig(
        name="host1", image=GuestImage(tmp_path, "6.1.0-x", has_udev=False),
        lun_path=tmp_path / "lun", share_dir=tmp_path / "share",
        console_path=tmp_path / "console.log", control_socket=tmp_path / "agent.sock",
        pid_file=tmp_path / "qemu.pid",
    )
    argv = qemu_argv(config)
    drive = argv[argv.index("-drive") + 1]
    assert "cache=none" in drive and "file.locking=off" in drive
    blk = next(a for a in argv if a.startswith("virtio-blk-pci,"))
    assert blk.startswith("virtio-blk-pci,drive=san0,share-rw=on,serial=SAN0,")
    assert "logical_block_size=512" in blk and "physical_block_size=512" in blk
    assert "-no-reboot" in argv and "-daemonize" in argv
    assert argv[argv.index("-pidfile") + 1] == str(config.pid_file)
    assert "vmbed.name=host1" in argv[argv.index("-append") + 1]


def test_init_script_names_every_guest_module() -> None:
    text = initramfs.init_script(["dm_mod", "softdog"])
    assert "modprobe -a dm_mod softdog" in text
    assert "@" not in text.replace("$*", "")


def test_public_api_is_pinned() -> None:
    assert sorted(sharedlvm_testbed.vmbed.__all__) == [
        "DEFAULT_CACHE_DIR", "Guest", "GuestAgentError", "GuestBed", "GuestBootError",
        "GuestCommandError", "GuestImage", "GuestResult", "HostUnsupported",
        "ImageBuildError", "VmBedError", "build_image", "ensure_host_packages",
    ]


def test_apt_policy_parsing_sees_every_version() -> None:
    from sharedlvm.command import Result, Runner
    from sharedlvm_testbed.vmbed import debs

    text = """udev:
  Installed: (none)
  Candidate: 252.39-1~deb12u2
  Version table:
     252.39-1~deb12u2 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
 *** 252.38-1~deb12u1 100
        100 /var/lib/dpkg/status
kmod:
  Installed: (none)
  Candidate: (none)
  Version table:
"""

    class FakeRunner(Runner):
        def run(self, argv, **kwargs):  # type: ignore[no-untyped-def]
            return Result(list(argv), 0, text, "", 0.0)

    policy = debs.policy(FakeRunner(), ["udev", "kmod"])
    assert policy["udev"] == ("252.39-1~deb12u2", ["252.39-1~deb12u2", "252.38-1~deb12u1"])
    assert policy["kmod"] == (None, [])
