"""srun / torchrun wrappers and the demo; owns no training logic."""
