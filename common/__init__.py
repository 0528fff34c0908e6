"""leukfed.common."""
