import sys

from gvmrl.cli import main

sys.exit(main())
