"""CAN interface adapters that add to what python-can offers (loss visibility)."""
