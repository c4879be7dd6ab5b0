import sys

from promptdml.cli import main

sys.exit(main())
