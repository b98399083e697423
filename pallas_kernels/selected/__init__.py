"""selected branch kernels and their pure-jnp twin."""
