"""The text modality: sentence data, analytic text leaks, text attacks and token decoders."""
