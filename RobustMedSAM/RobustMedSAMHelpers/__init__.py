"""Parts of the RobustMedSAM Slicer module (the module file stays thin)."""
