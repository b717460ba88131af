"""The sans-I/O cores of the relay: decisions and data structures with no sockets, no event
loop, no LiteLLM and no Redis (tests/test_layers.py checks that nothing here imports
them). Each is driven by the asyncio glue in ``relay.runtime``.

- ``lifecycle``: a stream's states and the one transition table the hub carries out;
- ``ports``: the interfaces between the hub and its adapters (a stream's source, the sink it
  logs into, the replication hook, what other relays may ask of the hub);
- ``streamlog``: a stream's compact frame log (the only buffer between producer and readers);
- ``connection``: one connection's machine, for every wire dialect (``llm_relay_protocol.dialect``):
  handshake, authentication, start admission, every close code and error frame;
- ``auth``: API keys and signed tokens (JWT) -> credentials and principals;
- ``limits``: token buckets and per-principal accounting;
- ``errors``: the relay's own refusals, each carrying its wire code.
"""
