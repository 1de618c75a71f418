"""One runner for every modality: recipes, the run loop, per-modality hooks, the run directory."""
