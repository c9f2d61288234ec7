"""The DINOv2 backbone with a morphology head, LoRA adapters and count-aware losses."""
