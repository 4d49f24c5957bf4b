"""Real device-mapper on a reader host: after the manager extends a volume that is in
use there, the reader's device shows the new size only after a refresh, and sharedlvm
does that refresh itself when the volume is used again (``volume path``/prepare)."""

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


@pytest.fixture(scope="module")
def image() -> Iterator[GuestImage]:
    try:
        ensure_host_packages(Runner())
        yield build_image(Runner())
    except HostUnsupported as exc:
        print(f"\nSKIP vm refresh: {exc}", file=sys.stderr)
        pytest.skip(str(exc))


def test_reader_refresh_after_extend(image: GuestImage, tmp_path: Path) -> None:
    lun = tmp_path / "lun.img"
    with lun.open("wb") as f:
        f.truncate(8 * GiB)
    bed = GuestBed(2, lun, tmp_path / "bed", image=image, share_dir=SRC_DIR)
    try:
        bed.start()
    except HostUnsupported as exc:
        pytest.skip(str(exc))
    try:
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
    finally:
        bed.stop()
