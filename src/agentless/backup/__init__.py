"""vmbackup, the reference third-party backup system.

Not built yet: this package is reserved by the architecture and holds no code.
"""
