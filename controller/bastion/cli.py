"""The `bastion` command line. Each concern registers its commands from its own module."""

import click


class _Main(click.Group):
    """Every command's last line of defence for bad input: a file or directory it was pointed
    at that cannot be used (unreadable, a file where a directory must be, a symlink loop), or a
    secret store's file that does not hold what it should, is a one-line error naming it, not a
    traceback. Each command still says more where it can."""

    def invoke(self, ctx: click.Context):
        from bastion.state.secrets import SecretError

        try:
            return super().invoke(ctx)
        except SecretError as e:  # a secret store's file that is not what it should hold
            raise click.ClickException(str(e)) from None
        except BrokenPipeError:  # `bastion events | head`: the reader has what it wanted;
            raise  # click's main() ends quietly then (status 1), as for any command
        except OSError as e:
            if e.filename is None:
                raise click.ClickException(str(e)) from None
            names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
            raise click.ClickException(f"{names}: {e.strerror or e}") from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-bastion")
def main() -> None:
    """Edge Bastion: network-boot Flatcar nodes from a small device and a controller."""


def _register() -> None:
    from bastion.flash import sim

    main.add_command(sim.sim_command)

    from bastion.flash import cli as flash_cli

    main.add_command(flash_cli.flash)

    from bastion.lab import cli as lab_cli

    main.add_command(lab_cli.lab_group)

    from bastion.assets import cli as assets_cli

    main.add_command(assets_cli.assets_group)

    from bastion.cluster import cli as cluster_cli

    main.add_command(cluster_cli.cluster_group)
    main.add_command(cluster_cli.tunnel_group)

    from bastion import machine_cli, serve_cli

    from bastion.device import cli as device_cli

    from bastion.operator import cli as operator_cli

    from bastion.fleet import cli as fleet_cli

    from bastion.logship import cli as logship_cli
    from bastion.regcache import cli as regcache_cli
    from bastion.ups import cli as ups_cli

    for command in (*serve_cli.COMMANDS, *device_cli.COMMANDS, *machine_cli.COMMANDS,
                    *operator_cli.COMMANDS, *fleet_cli.COMMANDS, *logship_cli.COMMANDS,
                    *regcache_cli.COMMANDS, *ups_cli.COMMANDS):
        main.add_command(command)


_register()
