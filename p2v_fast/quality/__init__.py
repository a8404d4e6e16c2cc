"""Measuring an edit: CLIP scores, flow warp error, evaluation of an edited clip."""
