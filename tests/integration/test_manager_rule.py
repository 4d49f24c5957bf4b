"""DESIGN.md rule 1: only the manager changes LVM metadata, enforced twice: sharedlvm
refuses on a non-manager host, and LVM itself refuses (locking_type=4) even when the
project's LVM module is asked directly."""

from __future__ import annotations

import pytest
from bed import Cluster

from sharedlvm import errors
from sharedlvm.command import RecordingRunner
from sharedlvm.domain import make_lvm

pytestmark = pytest.mark.integration

NOT_WRITER = "sharedlvm: host {id} is not the manager of domain dom1 (manager: host 1)"


def test_only_the_manager_writes(cluster: Cluster) -> None:
    """Metadata changes asked on other hosts are committed by the manager's daemon (in
    its generation); what other hosts may not ask for is refused and changes nothing."""
    gen = cluster.first.cli_json("manager", "status")["generation"]
    vol = cluster.hosts[1].cli_json("volume", "create", "--size", "1G")
    assert vol["generation"] == gen
    before = cluster.disk_state()
    for host in cluster.hosts[1:]:
        proc = host.cli("domain", "remove", "--force", check=False)
        assert proc.returncode == 1
        assert proc.stderr == NOT_WRITER.format(id=host.host_id) + "\n"
    assert cluster.disk_state() == before


def test_lvm_itself_refuses_on_non_manager(cluster: Cluster) -> None:
    reader = cluster.hosts[1]
    runner = RecordingRunner()
    d = reader.domain()
    lvm = make_lvm(reader.paths, runner, cluster.luns, writable=d.is_manager)
    before = cluster.disk_state()
    with pytest.raises(errors.ReadOnlyDenied):
        lvm.lvcreate(cluster.name, "sneaky", 128 * 1024**2, [])
    with pytest.raises(errors.ReadOnlyDenied):
        lvm.change_tags(cluster.name, "journal", add=["x"])
    with pytest.raises(errors.ReadOnlyDenied):
        lvm.vgremove(cluster.name)
    assert cluster.disk_state() == before
    # The refusal came from LVM because of the config the module passed.
    for argv in runner.calls:
        assert argv[0] == "lvm" and argv[2] == "--config"
        assert "locking_type = 4" in argv[3]


def test_domain_object_of_reader_is_read_only(cluster: Cluster) -> None:
    d = cluster.hosts[2].domain()
    assert not d.is_manager and not d.lvm.writable
    with pytest.raises(errors.ReadOnlyDenied):
        d.lvm.lvcreate(cluster.name, "x", 128 * 1024**2, [])
    with pytest.raises(errors.NotManager):
        d.require_manager()
    with pytest.raises(errors.NotManager), d.journal():
        pass
    # Only the daemon holding the manager lease writes: a Domain opened by any other
    # process, even on the manager host, is read-only down to LVM.
    w = cluster.first.domain()
    assert cluster.first.status()["manager"]
    assert not w.is_manager and not w.lvm.writable
    assert "locking_type = 4" in w.lvm.config.text()
