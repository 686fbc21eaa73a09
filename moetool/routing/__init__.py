"""Routing analysis (paper section 4.4, appendix B): capture per-token routing decisions, and
statistics of expert load, modality preference and expert pathways."""
