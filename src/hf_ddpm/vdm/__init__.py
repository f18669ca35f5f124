"""The variational diffusion model: schedules, the frozen chain, the ELBO, timestep sampling, the scheduler."""
