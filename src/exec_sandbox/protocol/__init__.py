"""Agent frames, sans-I/O: the wire models and the length-prefixed codec (:mod:`.agent`).

Imports only :mod:`exec_sandbox.errors`; everything that moves bytes lives in :mod:`exec_sandbox.client`.
"""
