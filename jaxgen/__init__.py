"""jaxgen: one small trainer for generative models (LMs and diffusion) in JAX."""

__version__ = "0.1.0"
