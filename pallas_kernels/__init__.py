"""Kernels of the co-serving step, each beside the plain-jnp reference that defines it.

This package depends only on jax.
"""
