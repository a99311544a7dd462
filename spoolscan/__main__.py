import sys

from spoolscan.cli import main

sys.exit(main())
