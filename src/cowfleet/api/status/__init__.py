"""The fleet status page (``GET /status``): one server-rendered HTML page for operators.

- :mod:`.view`: the page's data, built by pure functions from snapshots of the nodes
  and servers tables (nodes, the nodes x images cache matrix, pre-cache progress,
  recent builds);
- :mod:`.render`: the HTML, every value escaped, no front-end build;
- :mod:`.auth`: who is looking (``X-Auth-Token``, or the login form's cookie);
- :mod:`.routes`: ``/status``, ``/status/data``, ``/status/login``, ``/status/logout``.
"""
