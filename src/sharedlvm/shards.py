"""A domain's shards (format 2): one VG each, its own LVM, and where new volumes go.

docs/design.md "Shards": every LVM command parses the whole VG's metadata, so a domain
of many volumes is split over several VGs; a command reads and writes one shard's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from . import errors
from .activation import Activator
from .lvm import Lvm

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger(__name__)

# Volumes per shard the manager aims at: an LVM command costs about 15 ms + 55 us per
# LV in its VG (lvm2 2.03.16, bench/scale.py), so 500 keeps every command near 45 ms.
# A soft cap: when every shard has this many, the least loaded one still takes the
# next volume, and the manager logs that the domain wants another LUN.
SHARD_VOLUMES = 500

# After finding no free space for a new shard, the manager looks again after this
# long (a LUN grows by an admin's hand, not from one create to the next).
NO_ROOM_RECHECK = 60.0


def shard_vg_name(domain_name: str, index: int) -> str:
    """The VG of shard ``index``: the domain's name for shard 0, ``NAME+K`` after."""
    return domain_name if index == 0 else f"{domain_name}+{index}"


class Shard:
    """One VG of a domain, opened on this host: its LVM sees only the shard's PVs, so
    a command reads and writes one shard's metadata (docs/design.md "Shards")."""

    def __init__(self, index: int, vg_name: str, luns: tuple[str, ...], lvm: Lvm,
                 activator: Activator) -> None:
        self.index = index
        self.vg_name = vg_name
        self.luns = luns
        self.lvm = lvm
        self.activator = activator

    def __repr__(self) -> str:
        return f"Shard({self.index}, {self.vg_name!r}, {self.luns!r})"


# Called around each metadata command of a shard on the manager (manager.py).
ShardHook = Callable[[Shard], None]


class Placement:
    """Which shard takes a new volume (manager only): one under SHARD_VOLUMES with
    room for it, the fewest volumes first, then the most free space. The counts are
    read from LVM once per shard and term, then kept by this manager, the only
    writer; a failed operation makes it read a shard again."""

    def __init__(self, domain: Domain,
                 grow: Callable[[int, int], Shard | None] | None = None) -> None:
        """``grow(bytes, shards seen)``: a new shard made from free space, or None."""
        self._domain = domain
        self._grow_into = grow
        self._lock = threading.Lock()
        self._stats: dict[int, list[int]] = {}  # shard -> [volumes, free bytes]
        self._no_room_until = 0.0  # when to look for free space again

    def _read(self, shard: Shard) -> list[int]:
        vg = shard.lvm.vg(shard.vg_name)
        specials = len(self._domain.special_lvs()) if shard.index == 0 else 0
        return [vg.lv_count - specials, vg.free]

    def choose(self, size: int) -> Shard:
        shards = [s for s in self._domain.shards() if s.luns]
        with self._lock:
            missing = [s for s in shards if s.index not in self._stats]
        if missing:
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                read = list(pool.map(self._read, missing))
            with self._lock:
                for s, found in zip(missing, read, strict=True):
                    self._stats.setdefault(s.index, found)
        need = -(-size // self._domain.record.extent_size) * self._domain.record.extent_size
        with self._lock:
            stats = {s.index: self._stats[s.index] for s in shards}
        fits = [s for s in shards if stats[s.index][1] >= need]
        under = [s for s in fits if stats[s.index][0] < SHARD_VOLUMES]
        if not under:
            grown = self._grow(need, len(self._domain.shards()), probe=not fits)
            if grown is not None:
                return grown
        if not fits:  # LVM says no, with the sizes, in the request's own terms
            return max(shards, key=lambda s: stats[s.index][1])
        if not under:
            log.warning("domain %s: every shard has %d volumes or more: add a LUN "
                        "(domain extend) to keep metadata commands fast",
                        self._domain.name, SHARD_VOLUMES)
        return min(under or fits, key=lambda s: (stats[s.index][0], -stats[s.index][1],
                                                 s.index))

    def _grow(self, need: int, seen: int, probe: bool) -> Shard | None:
        """A shard made in the free space of a partitioned LUN, if there is any
        (``grow``: domain.grow_into_free_space); a failure is logged and left: the request
        goes on with the shards there are. ``probe``: look even if a look a moment
        ago found nothing (no shard has room: the request fails otherwise)."""
        if self._grow_into is None:
            return None
        if not probe and time.monotonic() < self._no_room_until:
            return None  # looked a moment ago: do not probe the LUNs at every create
        try:
            shard = self._grow_into(need, seen)
        except errors.Fenced:
            raise  # not the manager any more: the request stops here
        except errors.Error as exc:
            log.error("domain %s: cannot add a shard in free space: %s",
                      self._domain.name, exc)
            shard = None
        if shard is None:
            self._no_room_until = time.monotonic() + NO_ROOM_RECHECK
            return None
        with self._lock:
            self._stats[shard.index] = self._read(shard)
        self._no_room_until = 0.0
        return shard

    def used(self, shard: Shard, volumes: int, size: int) -> None:
        """This manager added (removed: negative) volumes and bytes in ``shard``."""
        extent = self._domain.record.extent_size
        with self._lock:
            stats = self._stats.get(shard.index)
            if stats is not None:
                rounded = -(-abs(size) // extent) * extent
                stats[0] += volumes
                stats[1] -= rounded if size > 0 else -rounded
                if stats[1] < 0:
                    del self._stats[shard.index]

    def forget(self, shard: Shard) -> None:
        with self._lock:
            self._stats.pop(shard.index, None)

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()
