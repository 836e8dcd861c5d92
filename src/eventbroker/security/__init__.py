"""Who may connect and what they may send.

- ``tokens``: producer tokens, their stored hashes, identities and type patterns;
- ``tls``: the listener's TLS context and client-certificate names;
- ``limits``: failed handshakes per address (connection limits are counted by
  the gateway's listener against ``LimitsConfig``);
- ``policy``: ``Security``, the three together as one listener uses them.

It builds on ``config`` and ``errors`` only.
"""
