"""Edge Bastion controller: boot service, device link and CLI."""

__version__ = "0.1.0"
