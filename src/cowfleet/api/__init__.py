"""The compute API: a Nova v2.1-compatible subset over the fleet's node agents.

``cowfleet serve api`` runs :func:`cowfleet.api.app.create_app`. The API keeps all of
its state in one SQL database (:mod:`cowfleet.api.db`), so several replicas can serve
one fleet; the scheduler (:mod:`cowfleet.scheduler`) places servers on the nodes that
register with it (``docs/fleet-protocol.md``).
"""
