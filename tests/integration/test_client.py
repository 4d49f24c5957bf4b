"""The client library against real daemons: typed results, the daemon's errors as
their own classes with their fields, also when a request id replays a failure."""

from __future__ import annotations

import os

import pytest
from bed import Cluster

from sharedlvm import Client, VolumeFormat, VolumeInfo, VolumeState, errors
from sharedlvm.command import RecordingRunner
from sharedlvm.domain import Domain
from sharedlvm.volume import list_volumes

pytestmark = pytest.mark.integration


def test_client_typed_results_and_errors(cluster: Cluster) -> None:
    h1, h2, _ = cluster.hosts
    c2 = Client(h2.root)  # not the manager: forwarded through the mailbox
    vol = c2.create_volume(1024**3, format="qcow2", tags={"vm": "web 1"}, request_id="cl-1")
    assert isinstance(vol, VolumeInfo)
    assert vol.format is VolumeFormat.QCOW2 and vol.state is VolumeState.READY
    assert vol.parent is None and vol.tags == {"vm": "web 1"}
    assert c2.list_volumes(tags={"vm": "web 1"}) == [Client(h1.root).volume_info(vol.uuid)]
    with h1.registered() as p1, h2.registered() as p2:
        path = Client(h1.root).prepare_volume(vol.uuid, p1)
        assert path.startswith("/dev/")
        with pytest.raises(errors.VolumeHeld) as held:
            c2.prepare_volume(vol.uuid, p2)
        assert held.value.volume == vol.uuid and held.value.hosts == [1]
        assert held.value.mode == "exclusive"
        with pytest.raises(errors.VolumeInUse) as in_use:
            c2.delete_volume(vol.uuid)
        assert in_use.value.hosts == [1]
        Client(h1.root).teardown_volume(vol.uuid)
        with pytest.raises(errors.InvalidArgument, match="not registered"):
            Client(h1.root).prepare_volume(vol.uuid, os.getpid())
    assert c2.manager_status().manager == 1
    assert [h.host_id for h in c2.list_hosts()] == [1, 2, 3]
    assert c2.delete_volume(vol.uuid).deleted


def test_replayed_failure_keeps_its_class(cluster: Cluster) -> None:
    """A request id that first failed with NoSpace fails with NoSpace again, with the
    same fields, asked on any host; and nothing was made either time."""
    h1, h2, h3 = cluster.hosts
    before = cluster.disk_state()
    with pytest.raises(errors.NoSpace) as first:
        Client(h2.root).create_volume(100 * 1024**4, request_id="too-big-1")
    assert first.value.requested >= 100 * 1024**4 and first.value.domain == cluster.name
    for host in (h1, h2, h3):
        with pytest.raises(errors.NoSpace) as again:
            Client(host.root).create_volume(100 * 1024**4, request_id="too-big-1")
        assert again.value.fields() == first.value.fields()
    proc = h3.cli("volume", "create", "--size", "100T", "--request-id", "too-big-1",
                  check=False)
    assert proc.returncode == 1 and proc.stderr == f"sharedlvm: {first.value}\n"
    assert cluster.disk_state() == before


def test_volume_list_does_not_activate_the_journal(cluster: Cluster) -> None:
    """Listing reads LVM and the domain record (how many shards: read on the PV, no
    activation: loop, no losetup), and changes nothing."""
    vol = cluster.first.cli_json("volume", "create", "--size", "128M")
    host = cluster.hosts[2]
    runner = RecordingRunner()
    d = Domain.open(host.paths, runner, cluster.name)
    assert [v.uuid for v in list_volumes(d)] == [vol["uuid"]]
    assert [c for c in runner.calls if c[0] != "lvm"] == []
    assert {c[1] for c in runner.calls} <= {"lvs", "vgs", "pvs"}
