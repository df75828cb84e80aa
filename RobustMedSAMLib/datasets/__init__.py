"""Sample and benchmark data: synthetic phantoms with true masks, MedSegBench files."""
