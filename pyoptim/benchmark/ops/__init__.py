"""The benchmarked ops, one module each, each defining `OP` (or `OPS`): found by harness.discover_ops()."""
