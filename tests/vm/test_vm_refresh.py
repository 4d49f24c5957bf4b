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
