"""sharedlvm: VM disks on shared SAN LUNs with plain LVM2 and sanlock storage leases.

The public surface: the ``sharedlvm`` command (``sharedlvm.cli``), the client library
(:class:`Client`, talking to this host's daemon), the errors it raises (``errors``)
and the types it returns. Everything else is internal and may change.
"""

from . import errors
from .client import Client
from .errors import Error
from .model import (
    Allocation,
    Deleted,
    DomainInfo,
    HostInfo,
    ManagerStatus,
    ServiceStatus,
    VolumeFormat,
    VolumeInfo,
    VolumeState,
)

__all__ = ["Allocation", "Client", "Deleted", "DomainInfo", "Error", "HostInfo",
           "ManagerStatus", "ServiceStatus", "VolumeFormat", "VolumeInfo", "VolumeState",
           "__version__", "errors"]
__version__ = "0.2.0"
