"""The HTTP edge: what the relay decides and serves before, or beside, a WebSocket.

- ``handshake``: origins, forwarded addresses, one request per connection, body refusal;
- ``web``: the browser chat page's static files;
- ``metrics_http``: ``/metrics`` on a port of its own.
"""
