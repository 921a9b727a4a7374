"""The client side: ``Future``, ``ClientState`` (the client's tables, no I/O), the I/O
thread that talks to a remote broker, and ``progress``."""
