"""gvmrl: chain-of-thought RL with gradient-variance-minimising sample allocation (GVM)."""

__version__ = "0.1.0"
