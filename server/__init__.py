"""leukfed.server."""
