"""``python -m RobustMedSAMLib`` runs the command line."""

from RobustMedSAMLib.cli import main

raise SystemExit(main())
