"""The site's UPS through NUT: the upsd client (`nut`), the power-cut policy as pure functions
(`core`), the thread in `serve` that watches and acts (`runner`). docs/ups.md."""
