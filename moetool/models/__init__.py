"""Model families, presets and (later) the sparse LVLM."""
