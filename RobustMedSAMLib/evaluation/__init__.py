"""Evaluation harness: interactive 2D (MedicoSAM's click protocol), 3D propagation,
and the corruption matrix over models, datasets, corruption types, severities and seeds.

    from RobustMedSAMLib.evaluation import metrics, interactive, volumetric, matrix, report

``matrix.run_matrix`` drives everything and appends to a resumable CSV;
``report.write_report`` turns that CSV into a Markdown summary and PNG plots.
"""
