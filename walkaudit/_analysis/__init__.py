"""Which σ to evaluate (the sweep) and what the curves say (the fit): pure numpy/scipy."""
