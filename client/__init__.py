"""leukfed.client."""
