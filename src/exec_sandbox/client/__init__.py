"""The host end of the guest agent channel: request/response, streams and file transfer (:mod:`.agent`).

Guest errors are mapped to the :mod:`exec_sandbox.errors` tree here, once.
Imports :mod:`exec_sandbox.protocol` and the core modules below it.
"""
