"""Subcommands of ``telematics-sim``, one module each (see :mod:`simulator.cli`)."""
