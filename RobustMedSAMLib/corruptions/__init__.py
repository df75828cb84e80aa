"""Image corruptions that model what degrades real scans, at five severities.

``corrupt(image, name, severity, seed, spacing)`` degrades a 2D slice ``(rows,
cols)`` or a 3D volume ``(slices, rows, cols)`` (KJI); ``CORRUPTIONS`` maps each
name to its ``CorruptionSpec``; ``corruption_table()`` lists them. Numpy and
Pillow only.
"""

from RobustMedSAMLib.corruptions.registry import (
    CORRUPTIONS,
    SEVERITIES,
    CorruptionSpec,
    corrupt,
    corruption_table,
    get_corruption,
)

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "CorruptionSpec",
    "corrupt",
    "corruption_table",
    "get_corruption",
]
