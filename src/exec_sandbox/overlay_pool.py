"""Re-export kept for older imports: the overlay pool lives in :mod:`exec_sandbox.storage.overlay_pool`.

Nothing inside the package imports this module (``tests/unit/test_layers.py`` checks it).
"""

from exec_sandbox.storage.overlay_pool import *  # noqa: F403
from exec_sandbox.storage.overlay_pool import __all__ as __all__
