"""Central service: MQTT subscriber, result store and web UI with live updates."""
