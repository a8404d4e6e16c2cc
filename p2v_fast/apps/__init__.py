"""Programs built on the pipeline: batch and Ray, the web page, the demo, the ablation."""
