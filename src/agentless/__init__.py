"""Agentless virtual-machine backup.

The tree follows the three parties of the system and the formats and protocols they share:

* :mod:`agentless.vhd` – the VHD disk image format (footer, dynamic header, BAT, sector
  bitmaps, differencing chains, extent maps, coalesce, structural check);
* :mod:`agentless.nbd` – the Network Block Device protocol;
* :mod:`agentless.winserver` – the virtualization host;
* :mod:`agentless.wincenter` – the cloud management platform;
* :mod:`agentless.wddk` – the disk access kit that backup vendors use;
* :mod:`agentless.backup` – the reference third-party backup system.
"""

__version__ = "0.1.0"
