"""Uplink: getting stored batches off the vehicle (MQTT v5 over mutual TLS)."""
