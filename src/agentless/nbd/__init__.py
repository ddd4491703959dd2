"""The Network Block Device protocol: wire constants, asyncio server, client.

Not built yet: this package is reserved by the architecture and holds no code.
"""
