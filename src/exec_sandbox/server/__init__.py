"""``sbx serve``: an E2B-compatible HTTP service over exec_sandbox (control plane, envd, code interpreter).

Point the unmodified E2B SDKs at it::

    E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000 E2B_API_KEY=<key>

Modules: :mod:`~exec_sandbox.server.config` (settings, key hashing), :mod:`~exec_sandbox.server.registry`
(sandboxes, owners, deadlines), :mod:`~exec_sandbox.server.control` (E2B's REST control plane),
:mod:`~exec_sandbox.server.envd` (Process / Filesystem Connect services, ``/files``),
:mod:`~exec_sandbox.server.interpreter` (``/execute``, ``/contexts``),
:mod:`~exec_sandbox.server.app` (the ASGI app and its routing), :mod:`~exec_sandbox.server.metrics`.
Errors: :mod:`~exec_sandbox.server.errors`.
"""

from typing import TYPE_CHECKING

from smartvm.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from exec_sandbox.server.app import ServeApp, create_app
    from exec_sandbox.server.config import ServeConfig, hash_api_key, load_serve_config
    from exec_sandbox.server.errors import ServeError

_LAZY: dict[str, str] = {
    "ServeApp": "exec_sandbox.server.app",
    "create_app": "exec_sandbox.server.app",
    "ServeConfig": "exec_sandbox.server.config",
    "hash_api_key": "exec_sandbox.server.config",
    "load_serve_config": "exec_sandbox.server.config",
    "ServeError": "exec_sandbox.server.errors",
}

__all__ = ["ServeApp", "ServeConfig", "ServeError", "create_app", "hash_api_key", "load_serve_config"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
