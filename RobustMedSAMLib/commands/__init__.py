"""Sub-commands of the ``robustmedsam`` command line."""
