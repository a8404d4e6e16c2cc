"""Training the small ``mini`` pipeline on procedurally rendered scenes (``python -m training.mini``)."""
