"""WinServer, the virtualization host.

So far it offers the ``winserver vhd`` commands over :mod:`agentless.vhd`; the storage
repository, VMs, snapshots, CBT, grants and the four sub-commands come next.
"""
