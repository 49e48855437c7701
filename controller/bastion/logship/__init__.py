"""Logs off-site: every event the controller records, and the nodes' journals, shipped to the
collectors site.yaml `logs:` names (syslog RFC 5424 over TCP or TLS, the Loki push API), through
a bounded on-disk queue per target (docs/logs.md)."""
