import sys

from galaxalign_batch.cli import main

sys.exit(main())
