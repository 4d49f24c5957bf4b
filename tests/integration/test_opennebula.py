"""The OpenNebula drivers (contrib/opennebula): every DS and TM action called the way
oned calls it (docs/opennebula-notes.md: arguments, base64 XML on stdin), on the loop
bed's three hosts. The remote-exec setting is a script that runs ``bash -s`` locally
with the named host's ``SHAREDLVM_ROOT`` (hosts host1..host3, and "frontend", a root
with no sharedlvm domain: an undeployed VM's). The test plays oned and the VMM: the
VM is a real qemu started with ``sharedlvm run --image`` on ``<vmdir>/disk.0``,
written and read with HMP ``qemu-io``; live migration is ``sharedlvm vm migrate``.
Checks read the disk: volumes and their tags, chains, lease holders."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bed import Cluster, Host
from qemu_vm import wait_for

from sharedlvm import qmp, vmwatch
from sharedlvm.units import MiB

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ROOT / "contrib" / "opennebula"
VENV_BIN = Path(sys.executable).parent
VMID = 42
SYS_DS = 0
IMG_DS = 100
FULL_DS = 101  # an image datastore whose template says SHAREDLVM_CLONE=full
VMDIR = f"/var/lib/one/datastores/{SYS_DS}/{VMID}"


class One:
    """The drivers' environment: the fake remote-exec and OpenNebula CLIs."""

    def __init__(self, cluster: Cluster, directory: Path) -> None:
        self.cluster = cluster
        self.dir = directory
        self.frontend = directory / "frontend"
        self.frontend.mkdir()
        roots = "\n".join(f"    host{h.index}) export SHAREDLVM_ROOT={h.root} ;;"
                          for h in cluster.hosts)
        remote = directory / "remote"
        remote.write_text(
            "#!/bin/bash\n# the remote-exec setting of the tests: HOST bash -s, run here\n"
            'host=$1\nshift\ncase "$host" in\n'
            f"{roots}\n    frontend) export SHAREDLVM_ROOT={self.frontend} ;;\n"
            '    *) echo "ssh: Could not resolve hostname $host" >&2; exit 255 ;;\n'
            'esac\nexec "$@"\n')
        remote.chmod(0o755)
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        onedatastore = bin_dir / "onedatastore"
        onedatastore.write_text(
            "#!/bin/bash\n# onedatastore show -x ID: the datastore templates of the test\n"
            f'if [ "$3" = "{FULL_DS}" ]; then\n'
            f"  echo '<DATASTORE><ID>{FULL_DS}</ID><TEMPLATE>"
            "<SHAREDLVM_CLONE>full</SHAREDLVM_CLONE></TEMPLATE></DATASTORE>'\n"
            f'else\n  echo "<DATASTORE><ID>$3</ID><TEMPLATE/></DATASTORE>"\nfi\n')
        onedatastore.chmod(0o755)
        self.env = dict(os.environ, PATH=f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}",
                        SHAREDLVM_ONE_REMOTE=str(remote),
                        SHAREDLVM_ONE_STAGING=str(directory / "staging"))
        self.env.pop("SHAREDLVM_ROOT", None)

    def run(self, driver: str, action: str, *args: object, stdin: str = "",
            ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(DRIVERS / driver / action), *map(str, args)],
                              input=stdin, env=self.env, capture_output=True, text=True,
                              timeout=300)
        if ok:
            assert proc.returncode == 0, f"{driver} {action}: {proc.stderr}"
            assert all(ln.startswith(("INFO: ", "WARN: ", "DEBUG: "))
                       for ln in proc.stderr.splitlines()), proc.stderr
        return proc

    def tm(self, action: str, *args: object, stdin: str = "") -> str:
        return self.run("tm", action, *args, stdin=stdin).stdout

    def ds(self, action: str, image: dict[str, str], ds_id: int = IMG_DS,
           template: dict[str, str] | None = None) -> str:
        return self.run("datastore", action, image.get("ID", "0"),
                        stdin=ds_data(image, ds_id, template)).stdout

    def refused(self, driver: str, action: str, *args: object, stdin: str = "") -> str:
        """The action fails the way bad input must: one ERROR line, a non-zero exit,
        nothing changed on the disk."""
        before = self.volumes()
        proc = self.run(driver, action, *args, stdin=stdin, ok=False)
        assert proc.returncode != 0, proc
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("ERROR: "), proc.stderr
        assert self.volumes() == before
        return proc.stderr

    def volumes(self, *tags: str) -> list[dict[str, Any]]:
        args = [a for t in tags for a in ("--tag", t)]
        vols: list[dict[str, Any]] = self.cluster.first.cli_json("volume", "list", *args)
        return sorted(vols, key=lambda v: v["uuid"])

    def vmdir(self, host: Host | Path) -> Path:
        root = host if isinstance(host, Path) else host.root
        return root / VMDIR.lstrip("/")


def ds_data(image: dict[str, str], ds_id: int, template: dict[str, str] | None) -> str:
    """DS_DRIVER_ACTION_DATA as oned sends it: IMAGE and DATASTORE, base64."""
    root = ET.Element("DS_DRIVER_ACTION_DATA")
    img = ET.SubElement(root, "IMAGE")
    for key, value in image.items():
        if key != "TEMPLATE":
            ET.SubElement(img, key).text = value
    ET.SubElement(img, "TEMPLATE")
    ds = ET.SubElement(root, "DATASTORE")
    ET.SubElement(ds, "ID").text = str(ds_id)
    ET.SubElement(ds, "TYPE").text = "0"
    tpl = ET.SubElement(ds, "TEMPLATE")
    for key, value in {"BRIDGE_LIST": "unreachable host1 host2",
                       **(template or {})}.items():
        ET.SubElement(tpl, key).text = value
    return base64.b64encode(ET.tostring(root)).decode()


def vm_xml(disks: int) -> str:
    """The VM's XML as the VMM passes it to the migration hooks, base64."""
    root = ET.Element("VM")
    ET.SubElement(root, "ID").text = str(VMID)
    tpl = ET.SubElement(root, "TEMPLATE")
    for i in range(disks):
        disk = ET.SubElement(tpl, "DISK")
        ET.SubElement(disk, "DISK_ID").text = str(i)
        ET.SubElement(disk, "TM_MAD").text = "sharedlvm"
        ET.SubElement(disk, "DATASTORE_ID").text = str(IMG_DS)
    return base64.b64encode(ET.tostring(root)).decode()


class Vm:
    """The VM: qemu started by ``sharedlvm run --image IMAGE`` on <vmdir>/disk.0 of its
    host, as the VMM would start it (``incoming``: a migration's destination)."""

    def __init__(self, host: Host, image: str, directory: Path, name: str,
                 incoming: str = "") -> None:
        self.host = host
        self.socket = str(directory / f"{name}.qmp")
        self.out = directory / f"{name}.out"
        self._out = self.out.open("w")
        disk = host.root / VMDIR.lstrip("/") / "disk.0"
        before = {r.pid for r in vmwatch.read_records(host.paths)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sharedlvm", "run", "--image", image,
             *(["--incoming", incoming] if incoming else []), "--",
             "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
             "-drive", f"file={disk},format=qcow2,if=none,id=drive0,cache=none,"
             "aio=native,werror=enospc", "-qmp", f"unix:{self.socket},server=on,wait=off"],
            env=host.env, stdout=self._out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.qmp = qmp.Qmp(self.socket)
                    break
                except OSError:
                    assert self.proc.poll() is None, self.out.read_text()
                    assert time.monotonic() < deadline, "qemu did not start"
                    time.sleep(0.1)
            self.pid = next(r.pid for r in vmwatch.read_records(host.paths)
                            if r.pid not in before)
        except BaseException:
            self.stop()
            raise

    def hmp(self, line: str) -> None:
        self.qmp.execute("human-monitor-command", {"command-line": line}, timeout=120)

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.hmp(f'qemu-io drive0 "write -P {pattern:#x} {offset} {length}"')
        self._check("wrote ")

    def read_ok(self, offset: int, length: int, pattern: int) -> None:
        self.hmp(f'qemu-io drive0 "read -P {pattern:#x} {offset} {length}"')
        self._check("read ")

    def _check(self, ok: str) -> None:
        self._out.flush()
        lines = [ln for ln in self.out.read_text().splitlines()
                 if ln.startswith(("wrote ", "read ")) or "fail" in ln.lower()
                 or "error" in ln.lower()]
        assert lines and lines[-1].startswith(ok), lines[-3:]

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])

    def stop(self) -> None:
        if hasattr(self, "qmp"):
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()  # run passes it on to qemu's process group
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def image_of(one: One, host: Host, disk: int) -> str:
    rec = (one.vmdir(host) / f"disk.{disk}.sharedlvm").read_text()
    return next(ln.split("=", 1)[1] for ln in rec.splitlines() if ln.startswith("IMAGE="))


def info(host: Host, image: str) -> dict[str, Any]:
    result: dict[str, Any] = host.cli_json("image", "info", image)
    return result


def read_back(host: Host, image: str, checks: list[tuple[int, int, int]],
              path: str = "{0}") -> None:
    """Each (offset, length, pattern) read from the image under shared leases
    (``run --image IMAGE:ro``), through ``path`` (the leaf in the image dir by
    default, or a VM directory's disk.N: its backing links)."""
    cmds = [a for off, n, pat in checks for a in ("-c", f"read -P {pat:#x} {off} {n}")]
    out = host.cli("run", "--image", f"{image}:ro", "--", "qemu-io", "-r", "-f", "qcow2",
                   *cmds, path).stdout
    assert "fail" not in out.lower() and out.count("read ") == len(checks), out


def holders(host: Host, image: str) -> dict[str, list[int]]:
    return {v: sorted(h) for v, h in info(host, image)["holders"].items()}


@pytest.fixture(scope="module")
def one(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[One]:
    c = shared_cluster
    deadline = time.monotonic() + 90
    while c.manager() is not c.first:
        assert time.monotonic() < deadline, "host 1 did not get the manager role back"
        c.manager().client.release_manager(c.name)
        time.sleep(1)
    env = One(c, tmp_path_factory.mktemp("one"))
    try:
        yield env
    finally:
        c.clean()


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.stop()


@pytest.fixture(scope="module")
def images(one: One) -> dict[str, str]:
    """Two images registered with DS cp from a qcow2 file (0x11 in its first MiB): a
    non-persistent one (a template) and a persistent one."""
    src = one.dir / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "256M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(src)],
                   check=True, capture_output=True)
    out = {}
    for name, img_id, persistent in (("plain", "7", "0"), ("persistent", "8", "1")):
        image = {"ID": img_id, "PATH": str(src), "PERSISTENT": persistent}
        first = one.ds("cp", image)
        assert one.ds("cp", image) == first  # a retry: the same SOURCE, no second image
        source, fmt = first.split()
        assert fmt == "qcow2" and source.startswith(f"{one.cluster.name}/")
        out[name] = source
    return out


def test_datastore_actions(one: One, images: dict[str, str], tmp_path: Path) -> None:
    """cp (above, twice each), stat, monitor (DS and TM), mkfs, clone, export, rm, and
    the refusals of bad input."""
    h1 = one.cluster.first
    plain = images["plain"].split("/")[1]
    chain = info(h1, plain)["chain"]
    assert [v["role"] for v in chain] == ["template"]
    assert [v["role"] for v in info(h1, images["persistent"].split("/")[1])["chain"]] == \
        ["leaf"]
    assert len(one.volumes()) == 2
    read_back(h1, plain, [(0, MiB, 0x11), (MiB, MiB, 0)])

    assert one.ds("stat", {"PATH": str(one.dir / "src.qcow2")}).strip() == "256"
    for driver in ("datastore", "tm"):
        out = one.run(driver, "monitor", IMG_DS, stdin=ds_data({}, IMG_DS, None)).stdout
        values = dict(ln.split("=") for ln in out.split())
        domain = h1.cli_json("domain", "info")
        assert int(values["TOTAL_MB"]) == domain["size"] // MiB
        assert int(values["FREE_MB"]) == domain["free"] // MiB

    # mkfs: an empty qcow2 image (twice: one); save_as only names a SOURCE
    blank = {"ID": "9", "SIZE": "100", "FORMAT": "qcow2"}
    made = one.ds("mkfs", blank).strip()
    assert one.ds("mkfs", blank).strip() == made
    assert info(h1, made.split("/")[1])["chain"][0]["capacity"] == 100 * MiB
    reserved = one.ds("mkfs", {"ID": "10", "SIZE": "0", "FORMAT": "save_as"}).strip()
    assert reserved.split("/")[0] == one.cluster.name
    assert len(one.volumes()) == 3

    # clone: a full copy (twice: one), the data read back
    copy = {"ID": "11", "PATH": images["plain"], "PERSISTENT": "0"}
    cloned = one.ds("clone", copy)
    assert one.ds("clone", copy) == cloned
    copy_image = cloned.split()[0].split("/")[1]
    assert [v["role"] for v in info(h1, copy_image)["chain"]] == ["template"]
    read_back(h1, copy_image, [(0, MiB, 0x11)])

    # export: a qcow2 file on a bridge host, with its MD5; DISPOSE_CMD removes it
    exported = ET.fromstring(one.ds("export", {"ID": "7", "SOURCE": images["plain"]}))
    src = exported.findtext("IMPORT_SOURCE") or ""
    assert src.startswith("ssh://host1:")
    path = Path(src.split(":", 2)[2])
    assert exported.findtext("FORMAT") == "qcow2" and exported.findtext("SIZE") == "256"
    md5 = subprocess.run(["md5sum", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    assert exported.findtext("MD5") == md5
    subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", str(path)],
                   check=True, capture_output=True)
    subprocess.run(exported.findtext("DISPOSE_CMD") or "false", shell=True, env=one.env,
                   check=True)
    assert not path.exists()

    # cp and stat of a URL: streamed from the front-end (curl here)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               str(port)], cwd=one.dir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/src.qcow2"
        wait_for(lambda: subprocess.run(["curl", "-fsI", url], capture_output=True)
                 .returncode == 0, 30, "http server")
        assert one.ds("stat", {"PATH": url}).strip() == "256"
        fetched = one.ds("cp", {"ID": "13", "PATH": url, "PERSISTENT": "0"}).split()[0]
    finally:
        server.kill()
        server.wait()
    read_back(h1, fetched.split("/")[1], [(0, MiB, 0x11)])

    # rm: gone; rm again: fine
    for source in (made, cloned.split()[0], fetched):
        one.ds("rm", {"ID": "9", "SOURCE": source})
        one.ds("rm", {"ID": "9", "SOURCE": source})
    assert len(one.volumes()) == 2

    # bad input: one ERROR line, a non-zero exit, nothing changed
    one.refused("datastore", "cp")
    one.refused("datastore", "cp", "1", "2", stdin="x")
    one.refused("datastore", "rm", "1", stdin=ds_data({"SOURCE": "nodomain"}, IMG_DS, None))
    one.refused("datastore", "cp", "12", stdin="not base64 xml")
    unknown = f"{one.cluster.name}/{uuid.uuid4()}"
    err = one.refused("datastore", "clone", "12",
                      stdin=ds_data({"ID": "12", "PATH": unknown}, IMG_DS, None))
    assert "unknown SOURCE" in err
    err = one.refused("tm", "clone", f"frontend:{unknown}", f"host2:{VMDIR}/disk.0",
                      VMID, IMG_DS)
    assert "unknown SOURCE" in err, err
    one.refused("tm", "clone", f"frontend:{unknown}", f"host2:{VMDIR}/disk.0", VMID)
    err = one.refused("tm", "ln", f"frontend:{images['plain']}", f"host2:{VMDIR}/disk.0",
                      VMID, IMG_DS)
    assert "is a template" in err
    one.refused("tm", "snap_create", f"host2:{VMDIR}/disk.0", "x", VMID, IMG_DS)
    one.refused("tm", "premigrate", "host2", "host3", VMDIR, VMID)
    err = one.refused("tm", "mkimage", 64, "qcow2", f"host9:{VMDIR}/disk.3", VMID, SYS_DS)
    assert "Could not resolve hostname" in err
    one.refused("datastore", "monitor", IMG_DS, stdin=ds_data({}, IMG_DS,
                                                              {"BRIDGE_LIST": "nowhere"}))
    # a front-end file in a restricted directory is not read (OpenNebula's own
    # directories, the driver user's home, the datastore's RESTRICTED_DIRS), unless
    # under SAFE_DIRS
    secret = tmp_path / "restricted" / "one_auth"
    secret.parent.mkdir()
    secret.write_text("oneadmin:password\n")
    fence = {"RESTRICTED_DIRS": str(secret.parent)}
    for action in ("cp", "stat"):
        err = one.refused("datastore", action, "31", stdin=ds_data(
            {"ID": "31", "PATH": str(secret)}, IMG_DS, fence))
        assert "restricted directory" in err, err
    size = one.ds("stat", {"ID": "31", "PATH": str(secret)}, IMG_DS,
                  {**fence, "SAFE_DIRS": str(secret.parent)})
    assert size.strip() == "1"
    assert not one.vmdir(one.cluster.hosts[1]).exists()


def test_vm_life(one: One, images: dict[str, str], vms: list[Vm], tmp_path: Path) -> None:
    """Deploy on host 2 (clone twice, ln, mkimage, mkswap, context), data written by
    the VM; snapshots live and off, revert, delete (live merge and offline); live
    migration to host 3; a failed migration back (the source takes its lease back);
    resize; save-as; undeploy and resume on host 1; terminate."""
    _, h2, h3 = one.cluster.hosts
    h1 = one.cluster.first
    d2, d3 = one.vmdir(h2), one.vmdir(h3)
    vm_tag = f"one.vm={VMID}"
    # --- deploy --------------------------------------------------------------------
    for _ in range(2):  # a retry makes nothing twice
        one.tm("clone", f"frontend:{images['plain']}", f"host2:{VMDIR}/disk.0", VMID, IMG_DS)
        one.tm("clone", f"frontend:{images['plain']}", f"host2:{VMDIR}/disk.1", VMID,
               FULL_DS)
        one.tm("ln", f"frontend:{images['persistent']}", f"host2:{VMDIR}/disk.2", VMID,
               IMG_DS)
        one.tm("mkimage", 64, "qcow2", f"host2:{VMDIR}/disk.3", VMID, SYS_DS)
        one.tm("mkswap", 32, f"host2:{VMDIR}/disk.4", VMID, SYS_DS)
        # a second linked clone of the same template: the two share its UUID link
        one.tm("clone", f"frontend:{images['plain']}", f"host2:{VMDIR}/disk.6", VMID, IMG_DS)
    ctx = tmp_path / "context.sh"
    ctx.write_text("HOSTNAME='vm42'\n")
    proc = one.run("tm", "context", ctx, f"{ctx}:extra.sh", f"host2:{VMDIR}/disk.5", VMID,
                   SYS_DS)
    if (d2 / "disk.5").is_file():
        assert b"CONTEXT" in (d2 / "disk.5").read_bytes()[:64 * 1024]
    else:  # no ISO tool on this machine: the files, and a WARN saying so
        assert "WARN: " in proc.stderr
        assert (d2 / "disk.5.context" / "extra.sh").read_text() == "HOSTNAME='vm42'\n"
    assert len(one.volumes(vm_tag)) == 5  # the persistent image is not the VM's
    img0, img1 = image_of(one, h2, 0), image_of(one, h2, 1)
    template = info(h1, images["plain"].split("/")[1])["chain"][0]["uuid"]
    linked = info(h1, img0)["chain"]
    assert linked[0]["uuid"] == template and len(linked) == 2
    assert len(info(h1, img1)["chain"]) == 1  # SHAREDLVM_CLONE=full: a copy
    leaf0 = linked[1]["uuid"]
    assert os.readlink(d2 / "disk.0") == leaf0
    assert os.readlink(d2 / template) == str(
        h2.root / "run/sharedlvm" / one.cluster.name / img0 / template)
    assert image_of(one, h2, 2) == images["persistent"].split("/")[1]
    assert not any(h for vols in holders(h1, img0).values() for h in vols)  # nothing held
    swap = image_of(one, h2, 4)
    assert info(h1, swap)["chain"][0]["format"] == "raw"  # oned's DRIVER=raw for swap
    out = h1.cli("run", "--image", f"{swap}:ro", "--", "qemu-io", "-r", "-f", "raw",
                 "-c", "read -v 4086 10", "{0}").stdout
    assert "SWAPSPACE2" in out, out
    read_back(h2, img1, [(0, MiB, 0x11)], path=str(d2 / "disk.1"))

    # --- the VM runs on host 2: data, a live snapshot, a live merge ------------------
    vm = Vm(h2, img0, tmp_path, "a")
    vms.append(vm)
    vm.read_ok(0, MiB, 0x11)
    vm.write(MiB, MiB, 0x22)
    disk0 = f"host2:{VMDIR}/disk.0"
    one.tm("snap_create_live", disk0, 0, VMID, IMG_DS)
    one.tm("snap_create_live", disk0, 0, VMID, IMG_DS)
    vm.write(MiB, MiB, 0x33)
    one.tm("snap_create_live", disk0, 1, VMID, IMG_DS)
    vm.write(2 * MiB, MiB, 0x34)
    assert len(info(h1, img0)["chain"]) == 4
    one.tm("snap_delete", disk0, 1, VMID, IMG_DS)  # live: vm merge of the leaf
    one.tm("snap_delete", disk0, 1, VMID, IMG_DS)
    chain = info(h1, img0)["chain"]
    assert len(chain) == 3 and os.readlink(d2 / "disk.0") == chain[-1]["uuid"]
    vm.read_ok(MiB, MiB, 0x33)
    proc = one.run("tm", "snap_create", disk0, 5, VMID, IMG_DS, ok=False)
    assert proc.returncode != 0 and "live snapshot" in proc.stderr
    vm.stop()
    vms.remove(vm)
    # --- VM off: snapshot, revert (younger ones dropped), delete ----------------------
    one.tm("snap_create", disk0, 2, VMID, IMG_DS)
    one.tm("snap_create", disk0, 2, VMID, IMG_DS)
    h2.cli("run", "--image", img0, "--", "qemu-io", "-f", "qcow2", "-c",
           "write -P 0x44 1M 1M", str(d2 / "disk.0"))
    assert len(info(h1, img0)["chain"]) == 4
    one.tm("snap_revert", disk0, 0, VMID, IMG_DS)  # LINEAR: snapshot 2 goes too
    chain = info(h1, img0)["chain"]
    assert len(chain) == 3 and chain[-1]["tags"].get("one.below") == "0"
    read_back(h2, img0, [(0, MiB, 0x11), (MiB, MiB, 0x22), (2 * MiB, MiB, 0)],
              path=str(d2 / "disk.0"))
    one.tm("snap_delete", disk0, 0, VMID, IMG_DS)  # offline merge
    one.tm("snap_delete", disk0, 0, VMID, IMG_DS)
    assert len(info(h1, img0)["chain"]) == 2
    err = one.refused("tm", "snap_revert", disk0, 0, VMID, IMG_DS)
    assert "no snapshot 0" in err

    # --- live migration host 2 -> host 3 --------------------------------------------
    vm = Vm(h2, img0, tmp_path, "b")
    vms.append(vm)
    vm.write(3 * MiB, MiB, 0x55)
    one.tm("premigrate", "host2", "host3", VMDIR, VMID, SYS_DS, stdin=vm_xml(7))
    assert os.readlink(d3 / "disk.0") == info(h1, img0)["leaf"]
    uri = f"unix:{tmp_path}/mig.sock"
    dest = Vm(h3, img0, tmp_path, "c", incoming=uri)
    vms.append(dest)
    h2.cli("vm", "migrate", str(vm.pid), "--to-root", str(h3.root), "--to-pid",
           str(dest.pid), "--uri", uri)
    vm.proc.wait(timeout=60)
    one.tm("postmigrate", "host2", "host3", VMDIR, VMID, SYS_DS, stdin=vm_xml(7))
    assert not d2.exists()
    leaf = info(h1, img0)["leaf"]
    assert holders(h1, img0)[leaf] == [3]
    wait_for(lambda: dest.status() == "running", 10, "destination running")
    dest.read_ok(MiB, MiB, 0x22)
    dest.read_ok(3 * MiB, MiB, 0x55)
    vm = dest

    # --- a failed live migration host 3 -> host 2: failmigrate gives the lease back --
    one.tm("premigrate", "host3", "host2", VMDIR, VMID, SYS_DS, stdin=vm_xml(7))
    uri = f"unix:{tmp_path}/mig2.sock"
    dest = Vm(h2, img0, tmp_path, "d", incoming=uri)
    vms.append(dest)
    h2.cli("vm", "incoming", str(dest.pid))
    out = h3.cli_json("vm", "migrate-out", str(vm.pid), "--uri", uri)
    assert out["versions"]
    assert holders(h1, img0)[leaf] == []  # released: the handoff is cut here
    os.kill(dest.pid, signal.SIGKILL)
    dest.proc.wait(timeout=60)
    assert [v["state"] for v in h3.cli_json("vm", "list")] == ["migrated-out"]
    one.tm("failmigrate", "host3", "host2", VMDIR, VMID, SYS_DS, stdin=vm_xml(7))
    assert holders(h1, img0)[leaf] == [3]
    assert [v["state"] for v in h3.cli_json("vm", "list")] == ["running"]
    wait_for(lambda: vm.status() == "running", 10, "source resumed")
    vm.write(4 * MiB, MiB, 0x66)
    vm.read_ok(3 * MiB, MiB, 0x55)
    assert not d2.exists() and d3.exists()
    one.tm("failmigrate", "host3", "host2", VMDIR, VMID, SYS_DS, stdin=vm_xml(7))  # again
    assert holders(h1, img0)[leaf] == [3]

    # --- save-as of a snapshot while the VM runs, then the current state with it off --
    disk3 = f"host3:{VMDIR}/disk.0"
    one.tm("snap_create_live", disk3, 3, VMID, IMG_DS)
    vm.write(5 * MiB, MiB, 0x77)
    target = one.ds("mkfs", {"ID": "20", "SIZE": "0", "FORMAT": "save_as"}).strip()
    for _ in range(2):
        one.tm("cpds", disk3, target, 3, VMID, IMG_DS)
    saved = target.split("/")[1]
    read_back(h3, saved, [(MiB, MiB, 0x22), (4 * MiB, MiB, 0x66), (5 * MiB, MiB, 0)])
    err = one.refused("tm", "cpds", disk3, f"{one.cluster.name}/{uuid.uuid4()}", -1, VMID,
                      IMG_DS)
    assert "running VM" in err
    vm.stop()
    vms.remove(vm)
    target2 = one.ds("mkfs", {"ID": "21", "SIZE": "0", "FORMAT": "save_as"}).strip()
    one.tm("cpds", disk3, target2, -1, VMID, IMG_DS)
    read_back(h3, target2.split("/")[1], [(5 * MiB, MiB, 0x77)])

    # --- resize (VM off): the volatile disk, and disk 0, a linked clone's chain ----
    for _ in range(2):
        one.tm("resize", f"host3:{VMDIR}/disk.3", 512, VMID, SYS_DS)
    leaf0 = info(h3, img0)["leaf"]
    grown = h3.cli_json("volume", "info", leaf0)["capacity"] + 64 * MiB
    one.tm("resize", f"host3:{VMDIR}/disk.0", grown // MiB, VMID, IMG_DS)
    assert h1.cli_json("volume", "info", leaf0)["capacity"] == grown
    out = h3.cli("run", "--image", f"{img0}:ro", "--", "qemu-img", "info", "--output",
                 "json", "{0}").stdout
    assert json.loads(out)["virtual-size"] == grown
    volatile = image_of(one, h3, 3)
    assert h1.cli_json("volume", "info", info(h1, volatile)["leaf"])["capacity"] == 512 * MiB
    out = h3.cli("run", "--image", f"{volatile}:ro", "--", "qemu-img", "info", "--output",
                 "json", "{0}").stdout
    assert json.loads(out)["virtual-size"] == 512 * MiB

    # --- undeploy to the front-end, resume on host 1 ------------------------------------
    for i in range(7):
        one.tm("mv", f"host3:{VMDIR}/disk.{i}", f"frontend:{VMDIR}/disk.{i}", VMID, IMG_DS)
    one.tm("mv", f"host3:{VMDIR}", f"frontend:{VMDIR}", VMID, SYS_DS)
    assert not d3.exists()
    fe = one.vmdir(one.frontend)
    assert sorted(p.name for p in fe.glob("disk.*.sharedlvm")) == [
        f"disk.{i}.sharedlvm" for i in (0, 1, 2, 3, 4, 6)]
    for i in range(7):
        one.tm("mv", f"frontend:{VMDIR}/disk.{i}", f"host1:{VMDIR}/disk.{i}", VMID, IMG_DS)
    one.tm("mv", f"frontend:{VMDIR}", f"host1:{VMDIR}", VMID, SYS_DS)
    d1 = one.vmdir(h1)
    assert not fe.exists()
    assert os.readlink(d1 / "disk.0") == info(h1, img0)["leaf"]
    assert (d1 / "disk.5").exists() or (d1 / "disk.5.context").is_dir()
    vm = Vm(h1, img0, tmp_path, "e")
    vms.append(vm)
    for off, pat in ((0, 0x11), (MiB, 0x22), (3 * MiB, 0x55), (4 * MiB, 0x66),
                     (5 * MiB, 0x77)):
        vm.read_ok(off, MiB, pat)
    vm.stop()
    vms.remove(vm)

    # --- terminate: the persistent disk goes back (mvds), the rest is deleted --------
    persistent = images["persistent"].split("/")[1]
    one.tm("mvds", f"host1:{VMDIR}/disk.2", images["persistent"], VMID, IMG_DS)
    # a disk with an image of its own into a SOURCE: copied, then its own image goes
    kept = one.ds("mkfs", {"ID": "22", "SIZE": "0", "FORMAT": "save_as"}).strip()
    one.tm("mvds", f"host1:{VMDIR}/disk.1", kept, VMID, IMG_DS)
    one.tm("mvds", f"host1:{VMDIR}/disk.1", kept, VMID, IMG_DS)
    read_back(h1, kept.split("/")[1], [(0, MiB, 0x11)])
    assert not os.path.lexists(d1 / "disk.1")
    with pytest.raises(AssertionError, match="not found"):
        info(h1, img1)
    # disk 0 goes: the template's link stays, now disk 6's
    img6 = image_of(one, h1, 6)
    one.tm("delete", f"host1:{VMDIR}/disk.0", VMID, IMG_DS)
    assert os.readlink(d1 / template) == str(
        h1.root / "run/sharedlvm" / one.cluster.name / img6 / template)
    assert not os.path.lexists(d1 / "disk.0") and not os.path.lexists(d1 / leaf)
    for i in (0, 3, 4, 5, 6):
        one.tm("delete", f"host1:{VMDIR}/disk.{i}", VMID, IMG_DS)
        one.tm("delete", f"host1:{VMDIR}/disk.{i}", VMID, IMG_DS)
    one.tm("delete", f"host1:{VMDIR}", VMID, SYS_DS)
    assert not d1.exists()
    assert one.volumes(vm_tag) == []
    assert info(h1, persistent)["chain"]  # never deleted
    for source in (target, target2, kept):
        one.ds("rm", {"ID": "20", "SOURCE": source})


def test_persistent_image_snapshots(one: One, images: dict[str, str], vms: list[Vm],
                                    tmp_path: Path) -> None:
    """A persistent image (ln) snapshotted by its VM; the image's snapshots then
    reverted, deleted and flattened by the DS actions; terminate of an undeployed VM
    (its records on the front-end, the images deleted from a bridge host)."""
    h1, h2, _ = one.cluster.hosts
    source = images["persistent"]
    persistent = source.split("/")[1]
    disk = f"host2:{VMDIR}/disk.0"
    one.tm("ln", f"frontend:{source}", disk, VMID, IMG_DS)
    one.tm("mkimage", 64, "qcow2", f"host2:{VMDIR}/disk.1", VMID, SYS_DS)
    writes = [0x81, 0x82, 0x83]
    for snap, pattern in enumerate(writes):  # snapshot N holds pattern N at 8 MiB
        h2.cli("run", "--image", persistent, "--", "qemu-io", "-f", "qcow2", "-c",
               f"write -P {pattern:#x} 8M 1M", str(one.vmdir(h2) / "disk.0"))
        one.tm("snap_create", disk, snap, VMID, IMG_DS)
    # undeployed, then terminated: mvds keeps the image, delete finds no sharedlvm on
    # the front-end and deletes the volatile disk from a bridge host
    for i in range(2):
        one.tm("mv", f"host2:{VMDIR}/disk.{i}", f"frontend:{VMDIR}/disk.{i}", VMID, IMG_DS)
    one.tm("mv", f"host2:{VMDIR}", f"frontend:{VMDIR}", VMID, SYS_DS)
    one.tm("mvds", f"frontend:{VMDIR}/disk.0", source, VMID, IMG_DS)
    one.env["SHAREDLVM_ONE_BRIDGE_LIST"] = "host3"
    try:
        one.tm("delete", f"frontend:{VMDIR}/disk.1", VMID, SYS_DS)
        one.tm("delete", f"frontend:{VMDIR}", VMID, SYS_DS)
    finally:
        del one.env["SHAREDLVM_ONE_BRIDGE_LIST"]
    assert one.volumes(f"one.vm={VMID}") == []
    assert not one.vmdir(one.frontend).exists()
    assert len(info(h1, persistent)["chain"]) == 4

    def image(snap: int) -> dict[str, str]:
        return {"ID": "8", "SOURCE": source, "TARGET_SNAPSHOT": str(snap)}

    one.ds("snap_revert", image(1))  # LINEAR: snapshot 2 goes
    one.ds("snap_revert", image(1))
    chain = info(h1, persistent)["chain"]
    assert len(chain) == 3 and chain[-1]["tags"] == {"one.below": "1"}
    read_back(h1, persistent, [(8 * MiB, MiB, 0x82)])
    one.ds("snap_delete", image(0))
    one.ds("snap_delete", image(0))
    assert len(info(h1, persistent)["chain"]) == 2
    read_back(h1, persistent, [(8 * MiB, MiB, 0x82)])
    one.ds("snap_flatten", image(1))
    one.ds("snap_flatten", image(1))
    chain = info(h1, persistent)["chain"]
    assert len(chain) == 1 and chain[0]["role"] == "leaf"
    read_back(h1, persistent, [(0, MiB, 0x11), (8 * MiB, MiB, 0x82)])
    for name in ("plain", "persistent"):
        one.ds("rm", {"ID": "7", "SOURCE": images[name]})
    assert one.volumes() == []


def test_install(tmp_path: Path) -> None:
    """install.sh copies the scripts into remotes/{tm,datastore}/sharedlvm and the
    settings into remotes/etc; it changes oned.conf and vmm_execrc only when asked, and
    asked twice it changes nothing more."""
    remotes = tmp_path / "remotes"
    remotes.mkdir()
    oned = tmp_path / "oned.conf"
    oned.write_text(
        'TM_MAD = [\n    EXECUTABLE = "one_tm",\n    ARGUMENTS = "-t 15 -d dummy,ssh,ceph"\n]\n'
        'DATASTORE_MAD = [\n    EXECUTABLE = "one_datastore",\n'
        '    ARGUMENTS  = "-t 15 -d dummy,fs,ceph -s shared,ssh,ceph"\n]\n')
    execrc = tmp_path / "vmm_execrc"
    execrc.write_text('LIVE_DISK_SNAPSHOTS="kvm-qcow2 kvm-ceph"\n')
    before = oned.read_text()
    install = [str(DRIVERS / "install.sh"), "--remotes", str(remotes), "--owner",
               "root:root"]
    out = subprocess.run(install, capture_output=True, text=True, check=True).stdout
    assert "oned.conf was not changed" in out and oned.read_text() == before
    for kind, actions in (("tm", 18), ("datastore", 10)):
        installed = remotes / kind / "sharedlvm"
        assert len([p for p in installed.iterdir() if p.name != "sharedlvm-one.sh"]) == \
            actions
        assert (installed / "sharedlvm-one.sh").is_file()
    assert (remotes / "etc/sharedlvm/sharedlvm.conf").is_file()
    for _ in range(2):
        subprocess.run([*install, "--edit-oned-conf", str(oned), "--edit-vmm-execrc",
                        str(execrc)], capture_output=True, text=True, check=True)
        text = oned.read_text()
        assert '-d dummy,ssh,ceph,sharedlvm"' in text
        assert "-d dummy,fs,ceph,sharedlvm -s shared,ssh,ceph,sharedlvm" in text
        assert text.count('NAME = "sharedlvm"') == 2  # TM_MAD_CONF, DS_MAD_CONF
        assert execrc.read_text() == 'LIVE_DISK_SNAPSHOTS="kvm-qcow2 kvm-ceph kvm-sharedlvm"\n'


def test_install_makes_kvm_deploy_add_the_leases(tmp_path: Path) -> None:
    """--edit-kvm-deploy: OpenNebula's kvm deploy script (its shape: the deployment
    file written from stdin, later given to virsh create) passes the file through
    'sharedlvm libvirt add-leases' right before virsh (tests/integration/test_libvirt.py
    runs add-leases on a real domain); twice, it is edited once; a deployment with no
    sharedlvm disk goes through unchanged."""
    remotes = tmp_path / "remotes"
    deploy = remotes / "vmm" / "kvm" / "deploy"
    deploy.parent.mkdir(parents=True)
    deploy.write_text('#!/bin/bash\nDEP_FILE=$1\nmkdir -p $(dirname $DEP_FILE)\n'
                      'cat > $DEP_FILE\n'
                      'DATA=`virsh --connect $LIBVIRT_URI create $DEP_FILE`\n')
    shim = tmp_path / "bin" / "virsh"  # libvirt, as far as the deploy script goes
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\ncat "$4" > "$4.started"\n')
    shim.chmod(0o755)
    deploy.chmod(0o755)
    install = [str(DRIVERS / "install.sh"), "--remotes", str(remotes), "--owner",
               "root:root", "--edit-kvm-deploy"]
    for _ in range(2):
        subprocess.run(install, capture_output=True, text=True, check=True)
    text = deploy.read_text()
    assert text.count("libvirt add-leases --in-place") == 1
    assert text.index("cat > $DEP_FILE") < text.index("add-leases") < \
        text.index("create $DEP_FILE")
    xml = "<domain type='kvm'><name>one-1</name><devices/></domain>\n"
    dep = tmp_path / "one" / "deployment.0"
    env = dict(os.environ, LIBVIRT_URI="qemu:///system",
               PATH=f"{shim.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run([str(deploy), str(dep)], input=xml, text=True, check=True, env=env)
    assert (tmp_path / "one" / "deployment.0.started").read_text() == xml
    refused = subprocess.run([str(DRIVERS / "install.sh"), "--remotes", str(tmp_path),
                              "--edit-kvm-deploy"], capture_output=True, text=True)
    assert refused.returncode != 0 and "nothing installed" in refused.stderr
    assert not (tmp_path / "tm").exists()


def test_host_paths_without_sharedlvm_root() -> None:
    """A production host has no SHAREDLVM_ROOT (ssh starts 'bash -s' without it): the
    host side runs under 'set -u' all the same, paths as OpenNebula names them (the
    loop bed always sets it, so this broke nothing there; seen failing before)."""
    env = {k: v for k, v in os.environ.items() if k != "SHAREDLVM_ROOT"}
    lib = DRIVERS / "sharedlvm-one.sh"
    out = subprocess.run(["bash", "-c", f'. "{lib}"; h_dir /var/lib/one/datastores/0/42'],
                         env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, "/var/lib/one/datastores/0/42"), out.stderr
