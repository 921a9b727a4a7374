"""What crosses a process boundary: the frame format and its commands (``protocol``), the
stage records a task passes through (``records``), pickling (``serialization``, the only
cloudpickle user), shared memory for large arguments (``shm``), the task-process pipe
framing (``pipe``) and CurveZMQ keys (``curve``).

Everything above imports from here; nothing here imports from above.
"""
