"""`python -m fusednn ...` is the `fusednn` command (what torchrun's `-m fusednn train ...` runs)."""
import sys

from fusednn.tools.cli import main

sys.exit(main())
