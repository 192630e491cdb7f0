import sys

from svp.cli import main

sys.exit(main())
