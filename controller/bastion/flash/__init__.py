"""Putting the firmware on a device: what goes onto its flash (`image`), the arm64 chainloader
(`chainload`), `bastion flash` with mpremote (`cli`), and the sim board, the firmware on the
MicroPython unix port (`sim`, with its serial-line supervisor `simboard`)."""
