"""WinServer, the virtualization host.

What is here: the host's state directory (:mod:`.host`: CA, certificate, token, metadata
database), VMs with VHD disks and NICs (:mod:`.vms`), offline snapshots
(:mod:`.snapshots`), ``get_vdi_sm_info`` (:mod:`.sminfo`), remote-access grants and the
NBD export resolver built on them (:mod:`.grants`), changed block tracking (:mod:`.cbt`),
and the ``winserver`` commands. Still to come: the daemon with its HTTPS host API, the VM
datapath (NBD per disk, CBT marking), online snapshots, background coalescing and the
sub-commands ``prepare-backup``, ``update-backup-id`` and ``stop-remote-access``.
"""
