"""Training: stage policies and the DeepSpeed loop shared by the three stages."""
