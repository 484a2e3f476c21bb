"""`python -m layerline`: the `layerline` command without its installed script."""

import sys

from layerline.cli import main

sys.exit(main())
