"""Pallas kernels (GPU through Triton; CPU tests through interpret mode), each beside its jnp reference."""
