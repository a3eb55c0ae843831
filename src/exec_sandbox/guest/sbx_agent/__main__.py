"""Entry point: ``python3 -m sbx_agent`` (package on sys.path) or ``python3 path/to/sbx_agent``."""

import sys

if __package__:
    from .cli import main
else:  # run as a directory: sys.path[0] is this folder, the package is its parent's child
    import os

    sys.path[0] = os.path.dirname(sys.path[0])
    main = __import__("sbx_agent.cli", fromlist=["main"]).main

sys.exit(main())
