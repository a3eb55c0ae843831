"""smartvm: a microVM manager whose configuration speaks Firecracker's API."""

from smartvm.errors import ErrorCode, SmartVMError

__all__ = ["ErrorCode", "SmartVMError"]
