"""leukfed.models."""
