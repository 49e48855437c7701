"""The PXE lab: a site LAN in network namespaces with the sim board, the controller, a home
router (dnsmasq) and QEMU nodes. See docs/lab.md."""
