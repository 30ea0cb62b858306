import sys

from dlrm_mtl.cli import main

sys.exit(main())
