"""leukfed: federated learning for leukemia diagnosis from blood-smear microscopy."""

__version__ = "0.1.0"
