"""Digitizer adapters (C-STORE, hot folder, serial) that spool complete studies atomically."""
