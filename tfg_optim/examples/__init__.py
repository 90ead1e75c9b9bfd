"""Runnable examples: `python -m tfg_optim.examples.curve_fit`."""
