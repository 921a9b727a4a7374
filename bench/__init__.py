"""zmqexec's benchmark: each workload on ZMQExecutor(2) and ProcessPoolExecutor(2) side by
side in one run (and loky and Dask distributed when installed), reported as medians and
zmqexec/PPE ratios.  Run ``python -m bench --help``; ``bench/README.md`` explains it.

Why a package beside ``zmqexec`` rather than tests: speed is measured here, never as a
timed unit test; the test suite only runs ``python -m bench --smoke``.
"""
