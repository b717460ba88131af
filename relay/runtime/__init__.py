"""The asyncio glue: what owns sockets, tasks and timers, and carries out the decisions of
``relay.core``.

- ``server``: the WebSocket server (handshake checks, HTTP routes, one ``Session`` per socket);
- ``routes``: the WebSocket paths and the dialect (codec) spoken on each;
- ``session``: one connection of any dialect (reader, the one executor of the connection
  machine's actions, the one close path, writer, timers);
- ``streams``: launching and resuming streams for connections (``StreamService``);
- ``hub``: the relay-wide table of streams, one supervised task per stream;
- ``aisdk``: the ``/ai-sdk`` dialect's runtime adapter (its chat index);
- ``workers``: ``--workers N``, a supervisor of relay processes on one port;
- ``warmup``: loads what LiteLLM loads lazily before the first stream.

The interfaces between the hub and its adapters (the stream sources, the replication) are
in ``relay.core.ports``; ``relay.aio.cancel_and_wait`` stops a task without swallowing a
cancellation aimed at the caller.
"""
