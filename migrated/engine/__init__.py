"""The migration engines, one package per side, over the transport layer.

``source/`` moves a running VM away; ``destination/`` receives one and runs it before
its memory has arrived.  ``options`` holds what an operator can ask for, ``ram`` the
guest RAM arithmetic both sides share, ``stats`` the statistics, ``threads`` the owned
worker threads.
"""

from .destination import DestinationEngine
from .options import Mode, RecvOptions, SendOptions
from .source import SourceEngine
from .source.abort import phase_name

__all__ = ["DestinationEngine", "Mode", "RecvOptions", "SendOptions", "SourceEngine", "phase_name"]
