"""abliterate: directional ablation of behaviours from language-model weights."""

__version__ = "0.1.0"
