"""The embedded cluster of ``ZMQExecutor()`` on this machine."""
