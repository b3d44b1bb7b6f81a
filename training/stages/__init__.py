"""Stage runners: vae, vae_decoder, tiny_decoder, teacher, ode_init, self_forcing, export (see training/train.py)."""
