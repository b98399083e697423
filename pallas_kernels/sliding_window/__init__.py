"""sliding_window branch kernels and their pure-jnp twin."""
