"""Evaluators for generated videos (:mod:`training.eval.shapes_bench`)."""
