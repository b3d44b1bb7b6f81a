"""Stage runners: vae, teacher, ode_init, self_forcing, export (see training/train.py)."""
