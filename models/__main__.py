import sys

from jaxpaged.models.cli import main

sys.exit(main())
