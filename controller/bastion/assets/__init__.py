"""Boot files fetched into a site, verified: Flatcar's signed PXE images (`flatcar`), the
Raspberry Pi 4 UEFI firmware (`rpi4`), on the resumable downloads they share (`download`);
`cli` is `bastion assets`."""
