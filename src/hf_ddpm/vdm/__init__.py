"""The continuous-time variational diffusion model (VDM; Kingma et al. 2021): the log-SNR schedule gamma(t), its
ELBO, its sampler."""
