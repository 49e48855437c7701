"""Rendering: boot scripts, Go-style and Jinja2 templates, Butane to Ignition, validation."""
