"""sharedlvm: VM disks on shared SAN LUNs with plain LVM2 and sanlock storage leases.

The public surface is the ``sharedlvm`` command (``sharedlvm.cli``) and the names
re-exported here; everything else is internal and may change.
"""

from .domain import Domain, DomainInfo, create_domain
from .errors import Error
from .paths import HostPaths
from .volume import VolumeInfo

__all__ = ["Domain", "DomainInfo", "Error", "HostPaths", "VolumeInfo", "create_domain"]
__version__ = "0.1.0"
