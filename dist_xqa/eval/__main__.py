"""`python -m dist_xqa.eval DATASET PREDICTIONS ...`: see dist_xqa.eval.cli."""
import sys

from dist_xqa.eval.cli import main

sys.exit(main())
