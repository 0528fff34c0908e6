"""leukfed.simulations."""
