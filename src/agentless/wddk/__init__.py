"""wddk, the disk access kit that backup vendors use to read and write disks over NBD.

Not built yet: this package is reserved by the architecture and holds no code.
"""
