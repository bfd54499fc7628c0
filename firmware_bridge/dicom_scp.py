"""DICOM C-STORE receiver (pynetdicom): the digitizer sends, the inbox receives.

Why it is built this way:

* **Durable before acknowledged.** pynetdicom streams each received data set to a temp file
  (``_config.STORE_RECV_CHUNKED_DATASET``), so memory does not grow with the image. The
  handler copies that file, with our own File Meta Information, into the inbox through
  :meth:`Inbox.deliver` (temp -> fsync -> rename -> fsync dir) and only then returns 0x0000.
  Any failure returns a failure status (0xA700 out of resources, 0xC211 unable to process)
  and leaves nothing in the inbox, so the sender keeps the study and retries.
* **Same bytes in, same file out.** The File Meta we write holds no time stamp, so a study
  sent twice (a retry after a lost response) becomes two byte-identical files, which the edge
  daemon recognises by their sha256 and screens once.
* **Always reachable by the real digitizer.** Connections that have not yet sent an
  A-ASSOCIATE-RQ are *pending*; at most ``max_pending`` are kept, the oldest dropped first,
  and each is dropped anyway after ``acse_timeout_s``. Only associations that asked count
  against ``max_associations``, so idle or garbage connections cannot crowd the digitizer
  out. When that limit is reached, an association silent for ``preempt_idle_s`` gives its
  slot to the newcomer; any association idle for ``network_timeout_s`` is aborted.
* **No patient data in logs.** The data set is never decoded here; logs name the generated
  inbox file, the peer's address and AE title only.

The transport does not judge content: DX For Processing, a wrong body part or a corrupt
image are accepted here and refused (quarantined, with a reason the technician sees) by the
edge ingest, which is the one place that decides what can be screened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import uid as U
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from firmware_bridge.errors import BridgeUnavailable, InboxFull
from firmware_bridge.options import DicomOptions
from firmware_bridge.spool import Inbox, copy_stream

try:  # the ``bridge`` extra
    from pynetdicom import AE, _config, evt
    from pynetdicom.transport import ThreadedAssociationServer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise BridgeUnavailable(
        "the DICOM receiver needs pynetdicom: pip install 'osteofy-edge[bridge]'"
    ) from exc

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "DicomReceiver",
    "address_allowed",
]

from edge.audit import audit_event
from edge.ingest import J2K, JPEG

log = logging.getLogger(__name__)

# The radiograph storage classes we screen; DX For Processing is accepted and left to ingest.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX Image Storage - For Processing",
}
# What the device runtime can decode (edge.ingest's sets, so the two cannot drift apart), in
# the order offered to a sender that proposes several: native first (nothing to decode), then
# JPEG 2000, then JPEG lossless and JPEG-LS.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    str(U.ExplicitVRLittleEndian),
    str(U.ImplicitVRLittleEndian),
    *sorted(J2K),
    *sorted(JPEG),
)
# Fixed, so the same received data set always gives the same file (dedup by sha256).
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1.7715.1")
IMPLEMENTATION_VERSION = "OSTEOFY_BRIDGE1"

VERIFICATION = "1.2.840.10008.1.1"
THREAD_SLACK = 64

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC211


def address_allowed(address: str, allowed: tuple[str, ...]) -> bool:
    """Is ``address`` in one of the ``allowed`` addresses or networks? Empty allows all."""
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _dataset_offset(fh: BinaryIO) -> int:
    """Where the data set starts in pynetdicom's received file (after its File Meta)."""
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("received file has no File Meta group length")
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + group_length


def _file_meta(sop_class: str, sop_instance: str, syntax: str, source_aet: str) -> bytes:
    """Preamble, ``DICM`` and our File Meta Information, encoded."""
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_aet:
        meta.SourceApplicationEntityTitle = source_aet
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


_ADMITTED = "_osteofy_admitted"  # attributes we set on pynetdicom's Association objects
_LAST_ACTIVE = "_osteofy_last_active"
_BUSY = "_osteofy_busy"


class _Gate:
    """Admission control: pending connections (oldest evicted) and admitted associations.

    Nothing here depends on a close event arriving: closed sockets are pruned when seen, and
    admitted associations are counted among the server's *live* association threads, so a
    connection that vanishes without a goodbye cannot hold a slot for ever.
    """

    def __init__(self, max_pending: int, max_associations: int, preempt_idle_s: float) -> None:
        self.max_pending = max_pending
        self.max_associations = max_associations
        self.preempt_idle_s = preempt_idle_s
        self._lock = threading.Lock()
        self._pending: OrderedDict[socket.socket, None] = OrderedDict()
        self.evicted = 0
        self.preempted = 0

    def opened(self, sock: socket.socket) -> list[socket.socket]:
        """Register a new connection; return the pending ones to drop to make room."""
        with self._lock:
            for old in [s for s in self._pending if s.fileno() == -1]:
                del self._pending[old]
            self._pending[sock] = None
            drop = []
            while len(self._pending) > self.max_pending:
                old, _ = self._pending.popitem(last=False)
                drop.append(old)
            self.evicted += len(drop)
            return drop

    def forget(self, sock: socket.socket | None) -> None:
        """The connection sent its A-ASSOCIATE-RQ (or closed): it is no longer pending."""
        if sock is not None:
            with self._lock:
                self._pending.pop(sock, None)

    def admit(self, assoc: Any, live: list[Any]) -> tuple[bool, Any]:
        """``(admitted, victim)``: admit ``assoc`` if there is room, or make room.

        When ``max_associations`` live associations are admitted already, the one idle longest
        (no PDU for ``preempt_idle_s``, not inside a C-STORE) gives its slot up: the caller
        closes it. An association that connects and then sits silent cannot hold the
        digitizer out for the whole ``network_timeout_s``.
        """
        now = time.monotonic()
        with self._lock:
            admitted = [
                a for a in live if a is not assoc and getattr(a, _ADMITTED, False) and a.is_alive()
            ]
            victim = None
            if len(admitted) >= self.max_associations:
                idle = [
                    a
                    for a in admitted
                    if not getattr(a, _BUSY, False)
                    and now - getattr(a, _LAST_ACTIVE, now) >= self.preempt_idle_s
                ]
                if not idle:
                    return False, None
                victim = min(idle, key=lambda a: getattr(a, _LAST_ACTIVE, now))
                setattr(victim, _ADMITTED, False)
                self.preempted += 1
            setattr(assoc, _ADMITTED, True)
            setattr(assoc, _LAST_ACTIVE, now)
            return True, victim

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with an address allowlist and pending-connection limit."""

    bridge_allowed: tuple[str, ...] = ()
    bridge_gate: _Gate

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if address_allowed(host, self.bridge_allowed):
            return True
        log.warning("refused a connection from %s: not in bridge.dicom.allowed_addresses", host)
        audit_event("connection_refused", peer=host)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        for old in self.bridge_gate.opened(request):
            log.warning("dropped an idle connection that never asked for an association")
            _close_quietly(old)
        super().process_request(request, client_address)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # the association's reader sees EOF and ends


def _sock_of(assoc: Any) -> socket.socket | None:
    dul_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    return getattr(dul_socket, "socket", None)


class DicomReceiver:
    """The C-STORE SCP adapter: :meth:`start` binds and serves in threads, :meth:`stop` ends."""

    name = "dicom"

    def __init__(self, options: DicomOptions, inbox: Inbox) -> None:
        self.options = options
        self.inbox = inbox
        self.gate = _Gate(options.max_pending, options.max_associations, options.preempt_idle_s)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stored = 0
        self.failed = 0

    # --- life cycle ----------------------------------------------------------------------

    def _make_ae(self) -> Any:
        o = self.options
        ae = AE(ae_title=o.ae_title)
        # Pending connections are bounded by the gate, admitted ones by our check in
        # EVT_REQUESTED. pynetdicom's own limit counts every acceptor thread, including those
        # of closed connections that wait out acse_timeout before ending, so it is set well
        # above ours: it only caps threads under a flood.
        ae.maximum_associations = o.max_associations + o.max_pending + THREAD_SLACK
        ae.acse_timeout = o.acse_timeout_s
        ae.dimse_timeout = o.dimse_timeout_s
        ae.network_timeout = o.network_timeout_s
        ae.maximum_pdu_size = o.max_pdu_bytes
        ae.require_called_aet = True
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        return ae

    def start(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True  # stream to disk: memory independent of size
        o = self.options
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        try:
            server = ae.make_server((o.host, o.port), evt_handlers=handlers, server_class=_Server)
        except OSError as exc:
            raise BridgeUnavailable(
                f"cannot listen for DICOM on {o.host}:{o.port}: {exc.strerror or exc}"
            ) from None
        server.bridge_allowed = o.allowed_addresses
        server.bridge_gate = self.gate
        ae._servers.append(server)  # so server.shutdown() can deregister it
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="bridge-dicom", daemon=True
        )
        self._thread.start()
        log.info("DICOM receiver %s listening on %s:%d", o.ae_title, o.host, self.port)

    @property
    def port(self) -> int:
        """The bound port (useful when the options asked for port 0)."""
        if self._server is None:
            return self.options.port
        return int(self._server.server_address[1])

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in list(server.active_associations):
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("DICOM receiver stopped (%d stored, %d refused)", self.stored, self.failed)

    # --- association events --------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        peer = f"{assoc.requestor.address} (AE {calling!r})"
        allowed = self.options.allowed_calling_aets
        reason, rsd = None, (0, 0, 0)
        self.gate.forget(_sock_of(assoc))
        if allowed and calling not in allowed:
            reason, rsd = "calling AE title not in allowed_calling_aets", (0x01, 0x01, 0x03)
        elif called != self.options.ae_title.strip():
            reason, rsd = f"called AE title {called!r} is not ours", (0x01, 0x01, 0x07)
        else:
            live = self._server.active_associations if self._server is not None else []
            admitted, victim = self.gate.admit(assoc, live)
            if not admitted:
                reason, rsd = "too many associations at once", (0x02, 0x03, 0x02)
            elif victim is not None:
                log.warning(
                    "closed an idle association from %s to admit %s",
                    victim.requestor.address,
                    peer,
                )
                sock = _sock_of(victim)
                if sock is not None:
                    _close_quietly(sock)
        if reason is None:
            return
        log.warning("refused an association from %s: %s", peer, reason)
        audit_event("association_rejected", peer=str(peer), reason=reason)
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_established(self, event: Any) -> None:
        r = event.assoc.requestor
        log.info("association from %s (AE %r) established", r.address, r.ae_title)

    def _on_aborted(self, event: Any) -> None:
        log.info("association from %s aborted", event.assoc.requestor.address)

    def _on_pdu(self, event: Any) -> None:
        setattr(event.assoc, _LAST_ACTIVE, time.monotonic())

    def _on_released(self, event: Any) -> None:
        # The slot is free once the release is agreed, not when the thread has wound down:
        # a digitizer that opens its next association at once must not find it still taken.
        setattr(event.assoc, _ADMITTED, False)

    def _on_closed(self, event: Any) -> None:
        setattr(event.assoc, _ADMITTED, False)
        self.gate.forget(_sock_of(event.assoc))

    # --- C-STORE -------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        """Copy the received data set into the inbox; success only once it is durable."""
        setattr(event.assoc, _BUSY, True)  # never preempted while storing
        try:
            return self._store(event)
        finally:
            setattr(event.assoc, _BUSY, False)
            setattr(event.assoc, _LAST_ACTIVE, time.monotonic())

    def _store(self, event: Any) -> int:
        req = event.request
        source_aet = str(event.assoc.requestor.ae_title).strip()
        try:
            received = Path(event.dataset_path)
            with received.open("rb") as fh:
                start = _dataset_offset(fh)
                size = os.fstat(fh.fileno()).st_size - start
                head = _file_meta(
                    str(req.AffectedSOPClassUID),
                    str(req.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    source_aet,
                )

                def write(out: BinaryIO) -> None:
                    out.write(head)
                    fh.seek(start)
                    if copy_stream(fh, out) != size:
                        raise OSError("received data set changed while being copied")

                dest = self.inbox.deliver(write, size_hint=size + len(head))
        except InboxFull as exc:
            self.failed += 1
            log.error("C-STORE refused (0xA700 out of resources): %s", exc)
            return OUT_OF_RESOURCES
        except OSError as exc:
            self.failed += 1
            log.error("C-STORE refused (0xA700): cannot write the study (%s)", exc.strerror or exc)
            return OUT_OF_RESOURCES
        except Exception as exc:  # never a traceback with data-set content in it
            self.failed += 1
            log.error("C-STORE refused (0xC211): %s", type(exc).__name__)
            return UNABLE_TO_PROCESS
        self.stored += 1
        log.info(
            "stored a study from AE %r as inbox/%s (%d KiB)", source_aet, dest.name, size >> 10
        )
        return SUCCESS
