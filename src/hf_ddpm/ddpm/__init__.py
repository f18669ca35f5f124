"""The discrete-time diffusion model (DDPM; Ho et al. 2020, the source's variational diffusion model with T steps):
beta schedules, the frozen chain, the ELBO, timestep sampling, the scheduler."""
