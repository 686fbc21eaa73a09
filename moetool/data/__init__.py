"""Data: LLaVA-JSON datasets, conversation templates, label masking and collation, and the
synthetic shapes world."""
