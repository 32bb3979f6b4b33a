"""Specs: the attrs classes (:mod:`.schema`), validators, the converter and TOML loading."""
