"""One slice, one volume, many volumes: preprocessing, the predictor, the per-volume
session with its embedding cache, prompt propagation, zoom and batch runs."""
