"""Digitizer adapters (C-STORE, hot folder, serial) that spool complete studies atomically.

See docs/bridge.md. Only entry points configure logging; the package logger gets a
NullHandler so a library user sees nothing unless they ask.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
