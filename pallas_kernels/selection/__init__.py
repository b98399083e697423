"""selection branch kernels and their pure-jnp twin."""
