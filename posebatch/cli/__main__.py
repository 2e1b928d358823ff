import sys

from posebatch.cli import main

sys.exit(main())
