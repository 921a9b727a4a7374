"""The broker: ``BrokerState`` (every decision, no sockets) and the components it is
composed of (key table, run queue, outbox, rejoin, waits, status), and ``loop.Broker``, the
process's one ROUTER socket loop that drives it."""
