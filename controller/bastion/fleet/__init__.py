"""Many sites from a management cluster (docs/fleet.md): the Site and Machine custom resources,
generated from the site files' own models."""
