"""Bundled recipe files (TOML), installed as `leakkit.recipes`."""
