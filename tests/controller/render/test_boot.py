"""bastion.render.boot: the GRUB config's entries (the arm64 lab boots one through real GRUB)."""

from __future__ import annotations

from bastion.model import Boot
from bastion.render.boot import grub_config, ipxe_script


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


def test_grub_loads_an_initrd_named_for_ipxe_by_its_file_alone():
    # `--name main /x.img` is iPXE's `initrd` syntax (the name Flatcar's `initrd=main` finds);
    # GRUB's initrd takes files only, and quoted whole it looked for a file of that name
    text = grub_config(Boot("/assets/k", ("--name main /assets/a.img", "-n b /assets/b.img",
                                          "--name=c /assets/c.img"), ()), "node1")  # fmt: skip
    for initrd in ("initrdefi", "initrd"):
        assert f'\n{initrd} "/assets/a.img" "/assets/b.img" "/assets/c.img"\n' in text
    assert "--name" not in text and "-n" not in text
    # iPXE's script keeps the entry as written: it is iPXE's own syntax
    assert "initrd --name main /assets/a.img\n" in ipxe_script(Boot("/assets/k", ("--name main /assets/a.img",), ()))
