"""Video in and out: reading, writing, framing, sample clips, output paths, clip selection."""
