"""DeepSpeed ZeRO training: engine set-up, stages, the loop, checkpoints and resume."""
