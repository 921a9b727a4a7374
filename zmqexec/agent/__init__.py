"""The agent: ``AgentState`` (its decisions, no sockets and no processes), the agent
process's socket loop that drives it, the handle on one task process, and the code that
runs inside a task process (the only place user code is unpickled and run)."""
