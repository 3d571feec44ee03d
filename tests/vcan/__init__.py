"""Tests that need real SocketCAN vcan interfaces; run them with scripts/vcan-tier."""
