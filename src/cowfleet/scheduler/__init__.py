"""Placement: pure filters and weighers over a snapshot of the nodes, and atomic claims.

:func:`select.select` ranks the hosts that can take a request (decide); the caller
then claims on the best one with :func:`claims.claim`, a conditional UPDATE that the
database applies atomically, and falls through to the next host when it changes no
row (act). Nothing here does I/O except :mod:`claims`.
"""
