"""Pix2Video itself: DDIM, inversion and its cache, the edit loop, the guided latent update, the plan."""
