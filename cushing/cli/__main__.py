import sys

from cushing.cli import main

sys.exit(main())
