"""Image sources, robust decoding, preprocessing, datasets, and the token-directory format."""
