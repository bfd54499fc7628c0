"""The adapter seam: a tiny interface and a registry that imports each adapter lazily.

Choosing the hot folder never imports pynetdicom, choosing the C-STORE receiver never imports
pyserial (STYLE.md habit 2): the registry maps a name to ``module:Class`` and imports only the
adapters the configuration enables.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from firmware_bridge.spool import Inbox

__all__ = ["ADAPTERS", "Adapter", "make_adapter"]


class Adapter(Protocol):
    """What the service needs from an adapter. ``start`` raises BridgeUnavailable if it cannot
    run here; ``healthy`` is False once its worker thread has died."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def healthy(self) -> bool: ...


ADAPTERS: dict[str, str] = {
    "dicom": "firmware_bridge.dicom_scp:DicomReceiver",
    "hot_folder": "firmware_bridge.hot_folder:HotFolder",
    "serial": "firmware_bridge.serial_link:SerialReceiver",
}


def make_adapter(name: str, options: Any, inbox: Inbox) -> Adapter:
    """Construct the adapter registered as ``name`` with its options object."""
    module_name, _, class_name = ADAPTERS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    adapter: Adapter = cls(options, inbox)
    return adapter
