"""The bridge's settings, read once from :class:`osteofy.config.Config`.

``osteofy/config.py`` holds the keys of DESIGN.md (``bridge.dicom.{ae_title, port,
allowed_calling_aets, allowed_addresses}``, ``bridge.hot_folder``, ``bridge.serial``). The
limits and timeouts below have working defaults here and are read from the config when it grows
the keys named in ``docs/bridge.md`` ("Configuration"); until then the defaults apply. Every
adapter takes its options object, not the whole config, so tests can build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osteofy.config import Config

__all__ = ["BridgeOptions", "DicomOptions", "HotFolderOptions", "SerialOptions"]


def _get(section: Any, key: str, default: Any) -> Any:
    """``section.key`` when the config model has that field, else the module default."""
    value = getattr(section, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class DicomOptions:
    """The C-STORE receiver: identity, who may connect, and the limits that keep it reachable."""

    ae_title: str = "OSTEOFY"
    host: str = "0.0.0.0"  # the digitizer is on the clinic LAN
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title
    allowed_addresses: tuple[str, ...] = ()  # IPs or networks (CIDR); empty: any
    max_associations: int = 4  # established at once; a digitizer uses one
    max_pending: int = 8  # connections that have not yet sent A-ASSOCIATE-RQ
    acse_timeout_s: float = 10.0  # a connection must ask for an association within this
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0  # an idle association is dropped after this
    preempt_idle_s: float = 10.0  # when full, an association idle this long makes room
    max_pdu_bytes: int = 262_144


@dataclass(frozen=True)
class HotFolderOptions:
    path: Path
    poll_s: float = 1.0
    quiet_s: float = 2.0  # unchanged for this long (and seen unchanged twice) = complete
    max_file_bytes: int = 200 << 20


@dataclass(frozen=True)
class SerialOptions:
    device: str
    baudrate: int = 921_600
    idle_flush_s: float = 1.0  # an incomplete frame older than this is dropped (resync)
    reopen_s: float = 2.0  # retry interval while the device is unplugged
    max_image_bytes: int = 120 << 20


@dataclass(frozen=True)
class BridgeOptions:
    inbox: Path
    dicom: DicomOptions | None = field(default_factory=DicomOptions)
    hot_folder: HotFolderOptions | None = None
    serial: SerialOptions | None = None
    reserve_bytes: int = 64 << 20

    @classmethod
    def from_config(cls, cfg: Config) -> BridgeOptions:
        b, d = cfg.bridge, cfg.bridge.dicom
        dicom = DicomOptions(
            ae_title=d.ae_title,
            host=_get(d, "host", DicomOptions.host),
            port=d.port,
            allowed_calling_aets=tuple(d.allowed_calling_aets),
            allowed_addresses=tuple(d.allowed_addresses),
            max_associations=_get(d, "max_associations", DicomOptions.max_associations),
            max_pending=_get(d, "max_pending", DicomOptions.max_pending),
            acse_timeout_s=_get(d, "acse_timeout_s", DicomOptions.acse_timeout_s),
            dimse_timeout_s=_get(d, "dimse_timeout_s", DicomOptions.dimse_timeout_s),
            network_timeout_s=_get(d, "network_timeout_s", DicomOptions.network_timeout_s),
            preempt_idle_s=_get(d, "preempt_idle_s", DicomOptions.preempt_idle_s),
            max_pdu_bytes=_get(d, "max_pdu_bytes", DicomOptions.max_pdu_bytes),
        )
        max_file = int(cfg.ingest.max_file_mb * (1 << 20))
        hot = None
        if b.hot_folder is not None:
            hot = HotFolderOptions(
                path=Path(b.hot_folder),
                poll_s=_get(b, "hot_folder_poll_s", HotFolderOptions.poll_s),
                quiet_s=_get(b, "hot_folder_quiet_s", HotFolderOptions.quiet_s),
                max_file_bytes=max_file,
            )
        serial = None
        if b.serial:
            serial = SerialOptions(
                device=b.serial,
                baudrate=_get(b, "serial_baudrate", SerialOptions.baudrate),
                max_image_bytes=cfg.ingest.max_pixels * 2,
            )
        return cls(
            inbox=Path(cfg.data_dir) / "inbox",
            dicom=dicom if _get(d, "enabled", True) else None,
            hot_folder=hot,
            serial=serial,
            reserve_bytes=int(_get(b, "reserve_mb", 64)) << 20,
        )
