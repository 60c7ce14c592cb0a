"""Host networks that seeds grow on."""

from esper_jax.lattice.hosts.base import Host, host_forward, slot_config_for
from esper_jax.lattice.hosts.cnn import CNNHost
from esper_jax.lattice.hosts.flax_host import FlaxHost, HostImportError, import_host
from esper_jax.lattice.hosts.transformer import TransformerHost

__all__ = ["CNNHost", "FlaxHost", "Host", "HostImportError", "TransformerHost", "host_forward", "import_host",
           "slot_config_for"]
