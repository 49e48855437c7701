"""bastion.render.boot: the GRUB config's entries (the arm64 lab boots one through real GRUB)."""

from __future__ import annotations

from bastion.model import Boot
from bastion.render.boot import grub_config


def test_each_entry_loads_the_kernel_then_its_initrds():
    text = grub_config(Boot("/assets/k", ("/assets/a.img", "/assets/b img"), ("quiet", 'x="y"')), "node1")
    for kernel, initrd in (("linuxefi", "initrdefi"), ("linux", "initrd")):
        assert f'{kernel} "/assets/k" "quiet" "x=\\"y\\""\necho "Loading initrd"\n' \
            f'{initrd} "/assets/a.img" "/assets/b img"\n}}\n' in text  # fmt: skip


def test_a_profile_without_an_initrd_has_no_initrd_command():
    # GRUB's initrd without a file is an error ("filename expected"), shown on every boot of
    # such a profile before the kernel started
    text = grub_config(Boot("/assets/k", (), ("quiet",)), "node1")
    assert "initrd" not in text and "Loading initrd" not in text
    assert text.count('"/assets/k" "quiet"\n}\n') == 2
