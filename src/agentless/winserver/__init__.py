"""WinServer, the virtualization host.

The host's state directory (:mod:`.host`: CA, certificate, token, metadata database),
storage repositories (:mod:`.storage`), VMs with VHD disks and NICs (:mod:`.vms`), VDIs
(:mod:`.vdis`), snapshots and the garbage collection that keeps chains short
(:mod:`.snapshots`), changed block tracking (:mod:`.cbt`), remote-access grants
(:mod:`.grants`), the VM datapath and runtime (:mod:`.datapath`, :mod:`.runtime`), the
seed's four sub-commands (:mod:`.remoteaccess`, :mod:`.sminfo`), the daemon with its
HTTPS host API (:mod:`.daemon`, :mod:`.api`) and the ``winserver`` commands.

The public wire module is :mod:`agentless.winserver.client` – the typed host-API client
that WinCenter uses; nothing else of this package is meant to be imported by other
parties.
"""
