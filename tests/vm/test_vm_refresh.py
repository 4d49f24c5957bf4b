"""Real device-mapper on two guests sharing one disk (one boot for the module):

1. after the manager extends a volume that is in use on a reader, the reader's device
   shows the new size only after a refresh, and sharedlvm does that refresh itself
   when the volume is used again (``volume path``/prepare);
2. a domain on partitions of a multipath LUN: the LUN is a device-mapper map (as
   multipathd makes one, DM UUID ``mpath-<wwid>``), its partitions kpartx's maps on
   top of it; the reader host finds them at attach and uses a volume of the second
   shard, whose data the other host reads; then a qcow2 chain (a base and an overlay
   naming it by bare UUID) written on one host opens on the other through its image
   directory of device-mapper devices (the machine's own qemu-img and qemu-io, which
   the guests share with /usr)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedlvm.command import Runner
from sharedlvm_testbed.vmbed import (
    GuestBed,
    GuestImage,
    HostUnsupported,
    build_image,
    ensure_host_packages,
)

pytestmark = pytest.mark.vm

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
GiB = 1024**3

# Run in a guest: format a domain (as the creating host does) and create a volume
# with the manager's tags, using sharedlvm's own modules with this guest's LVM.
WRITER = """
import json, sys, uuid
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import create_domain, make_lvm
from sharedlvm.paths import HostPaths
from sharedlvm import tags
paths = HostPaths(Path("/tmp/h1"))
d = create_domain(paths, Runner(), "vmdom", ["/dev/vda"], 1)
vol = str(uuid.uuid4())
lvm = make_lvm(paths, Runner(), ["/dev/vda"], writable=True)
lvm.lvcreate("vmdom", vol, 1 << 30, [tags.make_tag("image", str(uuid.uuid4())),
             tags.make_tag("state", "ready"), tags.make_tag("format", "raw")])
print(json.dumps({"volume": vol}))
"""

EXTEND = """
import sys
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm
from sharedlvm.paths import HostPaths
lvm = make_lvm(HostPaths(Path("/tmp/h1")), Runner(), ["/dev/vda"], writable=True)
lvm.lvextend("vmdom", sys.argv[1], 2 << 30)
"""

READER_PATH = """
import sys
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain, attach_domain, attached_domains
from sharedlvm.paths import HostPaths
from sharedlvm import volume
paths = HostPaths(Path("/tmp/h2"))
if not attached_domains(paths):
    attach_domain(paths, Runner(), "vmdom", ["/dev/vda"], 2)
d = Domain.open(paths, Runner(), "vmdom")
assert not d.lvm.writable
print(volume.volume_path(d, sys.argv[1]))
"""

# The reader's own LVM (locking_type = 4, as on every host that is not manager)
# refuses a metadata write, whoever asks: LVM says so, not sharedlvm.
READER_LVCREATE = """
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain
from sharedlvm.errors import ReadOnlyDenied
from sharedlvm.paths import HostPaths
d = Domain.open(HostPaths(Path("/tmp/h2")), Runner(), "vmdom")
try:
    d.lvm.lvcreate("vmdom", "intruder", 1 << 27, [])
except ReadOnlyDenied as exc:  # mapped from LVM's own message
    print("REFUSED", exc.__cause__.err)  # LVM's own words
else:
    print("CREATED")
"""


@pytest.fixture(scope="module")
def image() -> Iterator[GuestImage]:
    try:
        ensure_host_packages(Runner())
        yield build_image(Runner())
    except HostUnsupported as exc:
        print(f"\nSKIP vm refresh: {exc}", file=sys.stderr)
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def bed(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestBed]:
    directory = tmp_path_factory.mktemp("vmrefresh")
    lun = directory / "lun.img"
    with lun.open("wb") as f:
        f.truncate(20 * GiB)  # sparse; room for two 8 GiB partitions in the second test
    guests = GuestBed(2, lun, directory / "bed", image=image, share_dir=SRC_DIR)
    try:
        guests.start()
    except HostUnsupported as exc:
        pytest.skip(str(exc))
    try:
        yield guests
    finally:
        guests.stop()


def test_reader_refresh_after_extend(bed: GuestBed) -> None:
    writer, reader = bed[0], bed[1]
    _, out, _ = writer.run(["python3", "-c", WRITER], timeout=120)
    vol = json.loads(out.strip().splitlines()[-1])["volume"]
    _, path, _ = reader.run(["python3", "-c", READER_PATH, vol], timeout=120)
    path = path.strip().splitlines()[-1]
    assert path == f"/dev/vmdom/{vol}"
    _, table, _ = reader.run(["dmsetup", "table", f"vmdom-{vol.replace('-', '--')}"])
    assert " linear " in table  # real device-mapper on the reader
    _, size, _ = reader.run(["blockdev", "--getsize64", path])
    assert int(size) == GiB
    # The manager extends the volume while the reader has it active.
    writer.run(["python3", "-c", EXTEND, vol], timeout=120)
    _, size, _ = reader.run(["blockdev", "--getsize64", path])
    assert int(size) == GiB  # the reader's table still maps the old size
    # Using the volume again through sharedlvm refreshes it.
    _, again, _ = reader.run(["python3", "-c", READER_PATH, vol], timeout=120)
    assert again.strip().splitlines()[-1] == path
    _, size, _ = reader.run(["blockdev", "--getsize64", path])
    assert int(size) == 2 * GiB
    # The reader cannot change the metadata: its LVM refuses, and nothing was made.
    _, out, _ = reader.run(["python3", "-c", READER_LVCREATE], timeout=120)
    assert "REFUSED" in out and "read" in out.lower(), out
    _, out, _ = writer.run(["lvm", "lvs", "--noheadings", "-o", "lv_name", "--config",
                            'devices{filter=["a|^/dev/vda$|","r|.*|"] use_devicesfile=0}',
                            "vmdom"])
    assert "intruder" not in out.split(), out


# Guest 1 (manager) makes a 1 GiB volume in the domain of the first test.
GROW_CREATE = """
import json, uuid
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import make_lvm
from sharedlvm.paths import HostPaths
from sharedlvm import tags
lvm = make_lvm(HostPaths(Path("/tmp/h1")), Runner(), ["/dev/vda"], writable=True)
vol = str(uuid.uuid4())
lvm.lvcreate("vmdom", vol, 1 << 30, [tags.make_tag("image", str(uuid.uuid4())),
             tags.make_tag("state", "ready"), tags.make_tag("format", "raw")])
print(json.dumps({"volume": vol}))
"""

# Guest 2: a writer with the device open (as qemu has a thin volume's), writing 1 MiB
# blocks (O_DIRECT) from 0 to END; a write at the device's end fails, and it waits,
# with the device still open, until the device is larger, then writes on.
GROW_WRITER = """
import fcntl, mmap, os, struct, sys, time
path, end = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
def size():
    return struct.unpack("Q", fcntl.ioctl(fd, 0x80081272, bytes(8)))[0]  # BLKGETSIZE64
off = 0
while off < end:
    buf[:] = bytes([1 + (off >> 20) % 250]) * (1 << 20)
    try:
        done = os.pwrite(fd, buf, off)
    except OSError as exc:
        done = 0
        print(f"write at {off} failed: {exc.strerror}", flush=True)
    if done == 1 << 20:
        off += done
        continue
    print(f"waiting at {off}, device {size()} bytes", flush=True)
    start = time.monotonic()
    while size() <= off:
        if time.monotonic() - start > 300:
            print("never grown", flush=True)
            sys.exit(2)
        time.sleep(0.05)
    print(f"grown to {size()} bytes, writing on", flush=True)
os.fsync(fd)
print(f"done at {off}", flush=True)
"""

# Guest 2: the refresh the daemon does after a thin volume's extend (vmwatch via
# Daemon.refresh_thin: the shard's activator), with the writer's device open.
GROW_REFRESH = """
import sys
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain
from sharedlvm.paths import HostPaths
d = Domain.open(HostPaths(Path("/tmp/h2")), Runner(), "vmdom")
shard = d.volume_shard(sys.argv[1])
shard.activator.refresh(shard.vg_name, sys.argv[1])
"""

# Guest 2: the first byte of each MiB block at the given offsets.
GROW_READ = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
for off in map(int, sys.argv[2:]):
    os.preadv(fd, [buf], off)
    print(off, buf[0], buf[4095])
"""


def test_a_writer_grows_past_the_old_end_after_a_refresh_under_it(bed: GuestBed) -> None:
    """Thin growth through real device-mapper (run after the first test: its domain):
    a writer on guest 2 holds the volume's device open and writes to its end, where
    its write fails; the manager (guest 1) extends the LV; guest 2 reloads its table
    with the writer's device still open, as the daemon does after a thin extend; the
    writer sees the new size on its open device and writes on past the old end; every
    block reads back, before and after the old end."""
    manager, host = bed[0], bed[1]
    _, out, _ = manager.run(["python3", "-c", GROW_CREATE], timeout=120)
    vol = json.loads(out.strip().splitlines()[-1])["volume"]
    _, path, _ = host.run(["python3", "-c", READER_PATH, vol], timeout=120)
    path = path.strip().splitlines()[-1]
    end = 3 * GiB // 2
    host.spawn(["python3", "-c", GROW_WRITER, path, end], log_file="/tmp/grow.out")

    def writer_says(text: str) -> str:
        deadline = time.monotonic() + 240
        while True:
            out = host.run(["cat", "/tmp/grow.out"], check=False).out
            if text in out or "never grown" in out:
                return str(out)
            assert time.monotonic() < deadline, out
            time.sleep(0.5)

    assert f"waiting at {GiB}" in writer_says("waiting at"), "the old end"
    manager.run(["python3", "-c", EXTEND, vol], timeout=120)  # to 2 GiB, in use
    _, size, _ = host.run(["blockdev", "--getsize64", path])
    assert int(size) == GiB  # the host's table still maps the old size
    host.run(["python3", "-c", GROW_REFRESH, vol], timeout=120)
    out = writer_says("done at")
    assert f"grown to {2 * GiB} bytes" in out and f"done at {end}" in out, out
    _, table, _ = host.run(["dmsetup", "table", f"vmdom-{vol.replace('-', '--')}"])
    assert table.split()[1] == str(2 * GiB // 512) and " linear " in table, table
    offsets = [0, GiB - (1 << 20), GiB, end - (1 << 20)]
    _, read, _ = host.run(["python3", "-c", GROW_READ, path, *offsets], timeout=120)
    for line, off in zip(read.strip().splitlines(), offsets, strict=True):
        want = 1 + (off >> 20) % 250
        assert line.split() == [str(off), str(want), str(want)], (line, want)


# Guest 1 formats a domain on partitions of the multipath LUN (as `domain create
# --partitions 2` does) and creates a volume in shard 1 with the manager's tags.
MP_WRITER = """
import json, uuid
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import create_domain, make_lvm
from sharedlvm.paths import HostPaths
from sharedlvm import partitions, tags
paths = HostPaths(Path("/tmp/mp1"))
create_domain(paths, Runner(), "mpdom", ["/dev/mapper/mpatha"], 1, split=2)
parts = partitions.members("/dev/mapper/mpatha")
vol = str(uuid.uuid4())
lvm = make_lvm(paths, Runner(), [parts[1]], writable=True)
lvm.lvcreate("mpdom+1", vol, 1 << 30, [tags.make_tag("image", str(uuid.uuid4())),
             tags.make_tag("state", "ready"), tags.make_tag("format", "raw")])
print(json.dumps({"volume": vol, "parts": parts}))
"""

# Guest 2 attaches with the whole LUN, as a host does: it must find the partitions.
MP_READER = """
import json, sys
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain, attach_domain, attached_domains
from sharedlvm.paths import HostPaths
from sharedlvm import volume
paths = HostPaths(Path(sys.argv[2]))
if not attached_domains(paths):
    attach_domain(paths, Runner(), "mpdom", ["/dev/mapper/mpatha"], int(sys.argv[3]))
d = Domain.open(paths, Runner(), "mpdom")
print(json.dumps({"shards": [list(s.luns) for s in d.shards()],
                  "path": volume.volume_path(d, sys.argv[1])}))
"""

PATTERN = "5a" * 512  # 512 bytes

# Host 1 makes a chain in shard 0 as the manager would (tags in the lvcreate, qemu-img
# create -u with the parent's bare UUID) and writes each volume through it.
CHAIN_WRITER = """
import json, subprocess, uuid
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain, make_lvm
from sharedlvm.model import Allocation, VolumeFormat, VolumeState
from sharedlvm.paths import HostPaths
from sharedlvm import images, partitions, tags, volume
paths = HostPaths(Path("/tmp/mp1"))
lvm = make_lvm(paths, Runner(), [partitions.members("/dev/mapper/mpatha")[0]],
               writable=True)
image, base, top = (str(uuid.uuid4()) for _ in range(3))
for n, (vol, parent) in enumerate(((base, None), (top, base))):
    lvm.lvcreate("mpdom", vol, 64 << 20, tags.volume_tags(
        image=image, parent=parent, fmt=VolumeFormat.QCOW2, alloc=Allocation.THIN,
        generation=1, lease=n + 1, state=VolumeState.READY, capacity=32 << 20))
d = Domain.open(paths, Runner(), "mpdom")
devs = {v: volume.volume_path(d, v) for v in (base, top)}
def run(*argv):
    subprocess.run(list(argv), check=True, capture_output=True)
run("qemu-img", "create", "-q", "-f", "qcow2", devs[base], str(32 << 20))
run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa1 0 1M", devs[base])
run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2", devs[top],
    str(32 << 20))
directory = images.link_chain(d, image, devs)
run("qemu-io", "-f", "qcow2", "-c", "write -P 0xb2 1M 1M", str(directory / top))
print(json.dumps({"image": image, "base": base, "top": top}))
"""

# Host 2 opens the chain through its own image directory, read-only.
CHAIN_READER = """
import json, subprocess, sys
from pathlib import Path
from sharedlvm.command import Runner
from sharedlvm.domain import Domain
from sharedlvm.paths import HostPaths
from sharedlvm import images, volume
d = Domain.open(HostPaths(Path("/tmp/mp2")), Runner(), "mpdom")
info = images.image_info(d, sys.argv[1])
devs = {v.uuid: volume.volume_path(d, v.uuid, read_only=True) for v in info.chain}
leaf = str(images.link_chain(d, sys.argv[1], devs) / info.leaf)
io = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xa1 0 1M", "-c",
                     "read -P 0xb2 1M 1M", "-c", "read -P 0 2M 1M", leaf],
                    check=True, capture_output=True, text=True).stdout
chain = json.loads(subprocess.run(["qemu-img", "info", "--output", "json",
                                   "--backing-chain", leaf], check=True,
                                  capture_output=True, text=True).stdout)
print(json.dumps({"io": io, "chain": [Path(i["filename"]).name for i in chain],
                  "devices": devs}))
"""


def test_domain_on_partitions_of_a_multipath_lun(bed: GuestBed) -> None:
    host1, host2 = bed[0], bed[1]
    for guest in (host1, host2):  # the first test's domain goes: a fresh disk
        guest.run(["dmsetup", "remove_all", "--force"])
    host1.run(["wipefs", "--all", "--quiet", "/dev/vda"])
    # A multipath map on each host, as multipathd would make it (here over the one
    # path each guest has), with the DM UUID multipath-tools gives it.
    for guest in (host1, host2):
        _, sectors, _ = guest.run(["blockdev", "--getsz", "/dev/vda"])
        guest.run(["dmsetup", "create", "mpatha", "--noudevsync",
                   "--uuid", "mpath-36001405sharedlvm",
                   "--table", f"0 {int(sectors)} linear /dev/vda 0"])
        guest.run(["dmsetup", "mknodes"])  # no udev in these guests to make the node
    _, out, _ = host1.run(["python3", "-c", MP_WRITER], timeout=300)
    made = json.loads(out.strip().splitlines()[-1])
    parts, vol = made["parts"], made["volume"]
    assert len(parts) == 2 and all(p.startswith("/dev/mapper/mpatha") for p in parts)
    # kpartx's maps: linear on top of the multipath map, DM UUID part<N>-mpath-...
    _, uuids, _ = host1.run(["dmsetup", "info", "-c", "--noheadings", "-o", "name,uuid"])
    assert {line.split(":")[1] for line in uuids.split() if ":part" in line} == {
        "part1-mpath-36001405sharedlvm", "part2-mpath-36001405sharedlvm"}, uuids

    # Host 2 has the multipath map but not its partitions: attach makes them.
    _, before, _ = host2.run(["dmsetup", "ls"])
    assert "mpatha" in before and parts[0].rsplit("/", 1)[1] not in before
    _, out, _ = host2.run(["python3", "-c", MP_READER, vol, "/tmp/mp2", "2"], timeout=300)
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["shards"] == [[parts[0]], [parts[1]]]
    assert seen["path"] == f"/dev/mpdom+1/{vol}"
    _, table, _ = host2.run(["dmsetup", "table", f"mpdom+1-{vol.replace('-', '--')}"])
    assert " linear " in table
    # Data written on host 2 through its maps is read on host 1 through its own.
    host2.run(["python3", "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
               "os.pwrite(fd, bytes.fromhex(sys.argv[2]), 0); os.fsync(fd)",
               seen["path"], PATTERN])
    _, out, _ = host1.run(["python3", "-c", MP_READER, vol, "/tmp/mp1", "1"], timeout=300)
    path1 = json.loads(out.strip().splitlines()[-1])["path"]
    _, data, _ = host1.run(["python3", "-c", "import os, sys; fd = os.open(sys.argv[1], "
                            "os.O_RDONLY | os.O_DIRECT); import mmap; b = mmap.mmap(-1, "
                            "4096); os.preadv(fd, [b], 0); print(b[:512].hex())", path1])
    assert data.strip() == PATTERN

    # A chain written on host 1 opens on host 2 through device-mapper devices linked
    # in its image directory: the overlay's backing file is the bare base UUID.
    _, out, _ = host1.run(["python3", "-c", CHAIN_WRITER], timeout=300)
    chain = json.loads(out.strip().splitlines()[-1])
    _, out, _ = host2.run(["python3", "-c", CHAIN_READER, chain["image"]], timeout=300)
    seen = json.loads(out.strip().splitlines()[-1])
    assert "Pattern verification failed" not in seen["io"], seen["io"]
    assert seen["io"].count("read ") == 3, seen["io"]
    assert seen["chain"] == [chain["top"], chain["base"]]
    for vol in (chain["base"], chain["top"]):
        assert seen["devices"][vol] == f"/dev/mpdom/{vol}"
        _, table, _ = host2.run(["dmsetup", "table", f"mpdom-{vol.replace('-', '--')}"])
        assert " linear " in table
