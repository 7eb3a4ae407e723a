"""Benchmarks: scripts that print measured figures, each run from the repository root as
``python -m benchmarks.NAME`` (``--help`` for its options). ``benchmarks.harness`` is their shared timing
harness and statistics; ``benchmarks.peer`` holds the parts of ``benchmarks.compare_peer``. Current figures,
each with its command: benchmarks/RESULTS.md; earlier ones and investigations: benchmarks/NOTES.md."""
