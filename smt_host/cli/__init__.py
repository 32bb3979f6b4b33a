"""The ``smt`` command, one module per command family."""
