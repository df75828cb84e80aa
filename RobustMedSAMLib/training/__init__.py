"""Fine-tuning the SAM-family models: decoder-only (with an embedding cache), SVD
parameter-efficient encoder adaptation, full fine-tuning, and training from scratch.

Entry points: ``TrainingConfig.from_toml`` and ``runner.train``; the command line is
``robustmedsam finetune CONFIG --out RUN_DIR [--resume]``.
"""
