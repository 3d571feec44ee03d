"""Remote commands: signed, expiring, replay-proof, authorised by the vehicle profile.

* :mod:`agent.commands.envelope` -- the signed envelope, its strict parser and the trust
  decision (:class:`~agent.commands.envelope.CommandVerifier`, pure logic), signing.
* :mod:`agent.commands.schema` -- parameter specs and checks (pure logic).
* :mod:`agent.commands.keys` -- the trusted command keys file; signing key generation.
* :mod:`agent.commands.replay` -- durable replay state and audit log (SQLite).

Nothing is re-exported here, so that the profile loader can import
:mod:`agent.commands.schema` without pulling in the rest (which imports the loader).
"""
