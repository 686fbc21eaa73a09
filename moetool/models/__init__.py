"""The LVLM: model families, the architecture sections, builders, the sparse model and its MoE
block, inference and Auto-class registration."""
