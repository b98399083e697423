"""compressed branch kernels and their pure-jnp twin."""
