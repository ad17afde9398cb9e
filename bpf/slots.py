"""The ztunnel listeners' places in the capture program's sockmap: a module of its own, so that a
ztunnel worker process (which never touches the kernel's BPF objects) names them without
importing the datapath and pyroute2 (about 22 MiB resident)."""

from enum import IntEnum


class Slot(IntEnum):
    """The ztunnel listeners' places in the program's sockmap."""

    OUTBOUND = 0  # connections enrolled pods open
    INBOUND_HBONE = 1  # HBONE (port 15008) to enrolled pods
    INBOUND_PLAINTEXT = 2  # any other TCP to enrolled pods
