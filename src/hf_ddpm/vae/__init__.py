"""The source's first model: the Gaussian VAE and its Markovian hierarchy."""
