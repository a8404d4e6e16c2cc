"""The models: loading by hub id or folder, the tiny random-weight set, depth, captions, prompts."""
