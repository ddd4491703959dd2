"""vmbackup, the reference third-party backup system.

It uses only WinCenter's REST API (:mod:`agentless.wincenter.client`) and wddk, so any
other vendor's product could take its place. Layers, top down::

    cli           the ``vmbackup`` command
    backupjob     one VM's backup: WinCenter task, wddk reads, chunks into the repository
    restorejob    restore as a new VM, export to raw/VHD, serve over NBD (mount)
    diskview      a restore point's disk as a read-only file, for file-level restore
    partitions    a guest disk's MBR or GPT partition table, read as untrusted input
    verify, prune, gc   housekeeping
    repository    restore points, index, blob writer (packs), locks   (docs/repository.md)
    points, catalog   restore points as versioned models; their local catalog
    diskindex     a disk's chunk ids as a two-level tree; its digest
    packs, keys   pack files; sealing (zstd, AES-256-GCM) and checking of every object
    storage       where objects live: a directory or S3 (docs/storage.md)
    errors        the error tree: what the CLI reports in one line, and why
"""
