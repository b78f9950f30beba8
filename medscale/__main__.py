import sys

from medscale.cli import main

sys.exit(main())
