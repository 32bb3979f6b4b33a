"""``smt new-plugin``: a complete plugin distribution per slot."""
