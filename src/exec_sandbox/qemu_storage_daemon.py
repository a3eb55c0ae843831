"""Re-export kept for older imports: the storage daemon lives in :mod:`exec_sandbox.storage.daemon`,
the qcow2 helpers (``ImageInfo``, ``get_image_info``, the builders) in :mod:`exec_sandbox.storage.qcow2`.

Nothing inside the package imports this module (``tests/unit/test_layers.py`` checks it).
"""

from exec_sandbox.storage.daemon import *  # noqa: F403
from exec_sandbox.storage.daemon import __all__ as _daemon_all
from exec_sandbox.storage.qcow2 import *  # noqa: F403
from exec_sandbox.storage.qcow2 import __all__ as _qcow2_all

__all__ = [*_daemon_all, *_qcow2_all]
