"""p2v-fast: Pix2Video text-guided video editing on Stable Diffusion 2 depth, made fast."""

__version__ = "0.1.0"
