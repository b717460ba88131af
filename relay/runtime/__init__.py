"""The asyncio glue: what owns sockets, tasks and timers, and carries out the decisions of
``relay.core``.

- ``server``: the WebSocket server (handshake checks, HTTP routes, one ``Session`` per socket);
- ``session``: one connection (reader, writer, timers);
- ``hub``: the relay-wide table of streams, one supervised task per stream;
- ``aisdk``: the ``/ai-sdk`` endpoint's session (the AI SDK chat protocol);
- ``workers``: ``--workers N``, a supervisor of relay processes on one port;
- ``warmup``: loads what LiteLLM loads lazily before the first stream.

The interfaces between the hub and its adapters (the stream sources, the replication) are
in ``relay.core.ports``; ``relay.aio.cancel_and_wait`` stops a task without swallowing a
cancellation aimed at the caller.
"""
