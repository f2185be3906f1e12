"""The manifest of a saved state: one typed owner of its schema, versioned, upgraded on read.

Format history (never edit a released step; add one):
  1  the first format (2026-11).
  2  adds `parent`: the checkpoint the VM was last restored from or taken after (None if
     unknown; every format-1 state reads as parentless), and `agent`: whether a guest agent
     listened when the state was saved (format 1: no).
  3  `files` may hold `ram`: the guest's RAM as a file (a clone of the running VM's RAM
     file); `memory` then holds device state only. Or `memory` may have been folded into the
     VM's chunk store: `files` then holds `memory.recipe` and `stream` the stream's own size
     and checksum. Nothing to upgrade (a format-2 state has neither), but a cbsd that reads
     only format 2 must refuse such states rather than load them wrongly.

Fields added later that a reader of the same format may ignore (no new format: nothing is
loaded differently because of them, and an older cbsd of format 3 drops them unread, so it
must not refuse them):
  `scheduled` (issue 24): taken by the VM's checkpoint schedule, not a user; `expires_ts`:
  when the schedule destroys it (None: never) -- a reader that ignores them only never
  expires the state;
  `timings` (issue 24): how long the save took and how long the guest stood still for it, for
  the metrics; None in a state saved before it existed.

A state is sealed as written: the manifest's own checksum covers the stored JSON, so the seal
is checked on the stored form and the upgrade runs after it (Ganeti upgrades its runtime files
on read the same way). A state written by a newer cbsd is refused with a message saying so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FORMAT = 3
MEMORY = "memory"
RAM = "ram"


@dataclass(frozen=True)
class DiskSnapshot:
    disk: str  # the disk's file name under vm/<jname>/
    tag: str  # the qcow2 internal snapshot's name


@dataclass(frozen=True)
class FileEntry:
    size: int
    xxh3_128: str


@dataclass(frozen=True)
class Timings:
    seconds: float  # the whole save: from its first QMP request to the manifest
    guest_gap: float  # how long the guest's vCPUs stood still for it (0: it was not running)


@dataclass
class Manifest:
    kind: str  # "checkpoint" or "hibernation"
    name: str
    jname: str
    created: str  # ISO 8601, UTC
    created_ts: float
    qemu_version: str
    accel: str
    machine: str
    spec: dict[str, Any]  # VMSpec.to_dict() at save time
    restore_relevant: dict[str, Any]  # VMSpec.restore_relevant() at save time
    argv: list[str]
    was_running: bool
    live: bool
    disk_snapshots: list[DiskSnapshot]
    files: dict[str, FileEntry]
    migration: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    agent: bool = False  # a guest agent had its channel open when the state was saved
    stream: FileEntry | None = None  # folded into the chunk store: the stream's size, checksum
    scheduled: bool = False  # taken by checkpoint_schedule= (core/manage/schedule.py)
    expires_ts: float | None = None  # a scheduled one's end (clock.now() seconds); None: never
    timings: Timings | None = None  # None: saved before cbsd recorded them

    @property
    def memory_size(self) -> int:
        return self.stream.size if self.stream is not None else self.files[MEMORY].size

    @property
    def folded(self) -> bool:
        """The stream lives in the VM's chunk store (storage/chunkstore.py), not in `memory`."""
        return self.stream is not None

    @property
    def ram_file(self) -> bool:
        """Saved from a VM whose RAM is a file: restore clones `ram` and loads the rest."""
        return RAM in self.files

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A stored manifest (any known format) -> the current one. ValueError if it is from
        a newer cbsd, KeyError/TypeError if a field is missing or malformed."""
        data = upgrade(data)
        body = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        body["disk_snapshots"] = [DiskSnapshot(str(s["disk"]), str(s["tag"]))
                                  for s in data["disk_snapshots"]]
        body["files"] = {str(k): FileEntry(int(v["size"]), str(v["xxh3_128"]))
                         for k, v in data["files"].items()}
        if data.get("stream") is not None:
            body["stream"] = FileEntry(int(data["stream"]["size"]),
                                       str(data["stream"]["xxh3_128"]))
        if data.get("timings") is not None:
            body["timings"] = Timings(float(data["timings"]["seconds"]),
                                      float(data["timings"]["guest_gap"]))
        return cls(**body)


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "parent": None}


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2,
                                                                 2: dict}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    version = data.get("format")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"unknown manifest format {version!r}")
    if version > FORMAT:
        raise ValueError(f"manifest format {version} is newer than this cbsd reads "
                         f"({FORMAT}): upgrade cbsd")
    while version < FORMAT:
        data = _UPGRADES[version](data)
        version += 1
        data["format"] = version
    return data
