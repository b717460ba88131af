"""Relays acting as one through Redis (``--redis``).

- ``redis_store``: the Redis adapter (streams, owner keys, pub/sub); raises only
  ``StoreUnavailable``;
- ``replication``: copies a stream's log to Redis, follows other relays' streams, carries
  cancel and takeover between relays (implements the hub's ports of ``relay.core.ports``:
  ``ReplicationHook``, and ``StreamSource`` for a followed stream; never imports
  ``relay.runtime``);
- ``shared_limits``: per-principal limits shared by the relays of a group.
"""
