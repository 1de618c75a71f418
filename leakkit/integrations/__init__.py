"""Bridges to the stacks users train with. Each module imports its framework when it is itself imported
(Flower: `leakkit.integrations.flower`, needs the `flower` extra)."""
