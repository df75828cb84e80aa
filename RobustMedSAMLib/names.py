"""The choice vocabularies every layer shares, standard library only.

The command line, the Slicer panel (which must import without torch) and the library's
own checks all take their choices from here, so a new model, projection or corruption
is named in one place. ``weights.registry`` and ``corruptions.registry`` hold what each
name means; tests keep those registries' keys equal to these tuples.
"""

MODEL_NAMES = (
    "litemedsam",
    "robustmedsam-lite",
    "sam",
    "medsam",
    "robustsam",
    "medicosam",
    "fused",
)
DEFAULT_MODEL = "robustmedsam-lite"  # the CLI, batch runs, the Python API and the Slicer panel
DEVICES = ("auto", "cpu", "cuda", "mps")
ENGINES = ("eager", "onnx", "openvino")
"""Engines: PyTorch, or the lite models' encoder and decoder under ONNX Runtime or OpenVINO."""
AXIS_NAMES = ("axial", "coronal", "sagittal")
PROJECTIONS = ("mask", "box", "points", "points_and_mask", "single_point")
OVERLAP_MEASURES = ("iou", "containment")
DEFAULT_OVERLAP = 0.5  # stop rules' defaults, measured on phantoms (docs/propagation.md)
DEFAULT_LIKENESS = 0.5
DEFAULT_STABILITY = 0.2
# each side of the box carried to the next slice moves out by this fraction (5 % won on
# corrupted phantoms and lost on the real scans: docs/propagation.md, "The carried box's margin")
DEFAULT_BOX_EXTENSION = 0.1
# each side of a box drawn on a slice moves out by this fraction before the first ask
# (SegmentOptions.seed_box_growth); measured on phantoms, docs/propagation.md
SEED_BOX_GROWTH = 0.05
CORRUPTION_NAMES = (
    "gaussian_noise",
    "rician_noise",
    "poisson_noise",
    "speckle_noise",
    "gaussian_blur",
    "motion_blur",
    "low_resolution",
    "motion_ghosting",
    "kspace_spike",
    "bias_field",
    "gamma_contrast",
    "jpeg_compression",
)
PROTOCOLS = ("interactive", "volumetric")
FIRST_PROMPTS = ("point", "box")
