"""The image modality: image data sources (and, later, image-specific attacks)."""
