"""C-MOVE and C-GET sub-operations (PS3.4 C.4.2 and C.4.3): one loop, two ways to send.

C-MOVE sends over a new association to the Move Destination (our asyncio SCU); C-GET sends over the
requesting association itself, on the contexts where the requestor accepted the SCP role.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from archive.errors import VnaError
from archive.index import LocatedInstance
from archive.stores import StoreRegistry
from gateway.dimse.pdu import PresentationContextRQ

log = logging.getLogger(__name__)

# PS3.4 C.4.2.1.5 / C.4.3.1.4 statuses
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING_SUBOPS_FAILED = 0xB000
REFUSED_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PROCESS = 0xC000
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255

# Sends one data set; returns the C-STORE status, or None when no context can carry it.
SendOne = Callable[[LocatedInstance, bytes], Awaitable[int | None]]
Progress = Callable[["SubOperations"], Awaitable[None]]


@dataclass(slots=True)
class SubOperations:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def counts(self, *, final: bool) -> dict[str, int]:
        """The Number of ... Sub-operations command fields (remaining is omitted when final)."""
        out = {"NumberOfCompletedSuboperations": self.completed, "NumberOfFailedSuboperations": self.failed,
               "NumberOfWarningSuboperations": self.warning}
        if not final:
            out["NumberOfRemainingSuboperations"] = self.remaining
        return out

    def final_status(self, cancelled: bool) -> int:
        if cancelled:
            return CANCEL
        if self.failed or self.warning:
            return WARNING_SUBOPS_FAILED if self.completed or self.warning else REFUSED_SUBOPS
        return SUCCESS


def contexts_for(instances: list[LocatedInstance]) -> list[list[PresentationContextRQ]]:
    """Presentation contexts to propose: one per (SOP class, stored syntax), in groups of 128."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    groups = []
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = pairs[start:start + MAX_CONTEXTS]
        groups.append([PresentationContextRQ(2 * n + 1, sop, (ts,)) for n, (sop, ts) in enumerate(chunk)])
    return groups


async def run_suboperations(instances: list[LocatedInstance], stores: StoreRegistry, send_one: SendOne,
                            progress: Progress, cancelled: asyncio.Event, *, timeout: float) -> SubOperations:
    """Read each object and send it, reporting progress after each; stop early when cancelled.

    The next object is read while the current one is being sent.
    """
    ops = SubOperations(remaining=len(instances))

    async def read(inst: LocatedInstance) -> bytes:
        return await stores.for_location(inst.store, inst.location).get(inst.location, offset=inst.dataset_offset,
                                                                        timeout=timeout)

    next_read: asyncio.Task[bytes] | None = asyncio.ensure_future(read(instances[0])) if instances else None
    try:
        for n, inst in enumerate(instances):
            if cancelled.is_set():
                break
            assert next_read is not None
            current = next_read
            next_read = asyncio.ensure_future(read(instances[n + 1])) if n + 1 < len(instances) else None
            ops.remaining -= 1
            try:
                data = await current
                status = await send_one(inst, data)
            except VnaError as exc:
                log.warning("sub-operation for %s failed: %s", inst.sop_instance_uid, exc)
                status = None
            if status == SUCCESS:
                ops.completed += 1
            elif status is not None and ((status & 0xF000) == 0xB000 or status in (0x0107, 0x0116)):
                ops.warning += 1  # PS3.7 C.4: the warning statuses; everything else is a failure
            else:
                ops.failed += 1
                ops.failed_uids.append(inst.sop_instance_uid)
            await progress(ops)
    finally:
        if next_read is not None:
            next_read.cancel()
    return ops
