"""Training data: synthetic domains (:mod:`training.data.shapes`) and prompt sets."""
