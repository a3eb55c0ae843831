"""Re-export kept for older imports: the storage daemon lives in :mod:`exec_sandbox.storage.daemon`.

Nothing inside the package imports this module (``tests/unit/test_layers.py`` checks it).
"""

from exec_sandbox.storage.daemon import *  # noqa: F403
from exec_sandbox.storage.daemon import __all__ as __all__
