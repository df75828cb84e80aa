"""File formats and the RAS-space types they carry: volumes, Slicer markups,
segmentation files and atomic writes (numpy, SimpleITK, pynrrd; no torch)."""
