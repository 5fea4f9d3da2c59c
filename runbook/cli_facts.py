"""The `runbook facts HOST` command: gather one host's facts (read-only, one round trip) and print them as JSON."""

from __future__ import annotations

import json

import click


@click.command("facts")
@click.argument("host")
@click.option("-i", "--inventory", "inventory", multiple=True, help="Inventory file, directory or `a,b,` list (repeatable).")
@click.option("--host-key-checking", type=click.Choice(["strict", "accept-new", "off"]),
              help="Unknown host keys: reject (strict, the default), record them (accept-new), or ignore (off).")
@click.option("--known-hosts", type=click.Path(dir_okay=False), help="Known-hosts file (default ~/.ssh/known_hosts).")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the host to answer.")
def facts(host: str, inventory: tuple[str, ...], host_key_checking: str | None, known_hosts: str | None,
          connect_timeout: float) -> None:
    """Show what a host is (OS, kernel, CPUs, memory, mounts, addresses, init, packages, sudo) as JSON.

    HOST is an inventory host, or `controller` for the control machine. Read-only: one fixed script
    runs over the connection. Exit codes: 0 gathered, 2 the gather failed, 3 unreachable, 4 unknown host.
    """
    from runbook.audit import Redactor
    from runbook.connections import Connection, ConnectOptions, connect
    from runbook.connections.local import LocalConnection
    from runbook.facts import gather
    from runbook.inventory import Inventory
    from runbook.model import CONTROLLER
    from runbook.runner import inventory_host_key_mode

    inv = Inventory.load(list(inventory) if inventory else None)
    for w in inv.warnings:
        click.echo(w.render(), err=True)
    conn: Connection
    if host == CONTROLLER:
        conn, redactor = LocalConnection(CONTROLLER), Redactor()
    else:
        h = inv.get(host)   # an unknown host: InventoryError (exit 4) with a did-you-mean
        options = ConnectOptions(host_key_checking=host_key_checking or inventory_host_key_mode([h]),
                                 known_hosts=known_hosts, connect_timeout=connect_timeout)
        conn, redactor = connect(h, h.connection, options), Redactor.from_vars(h.vars)
    conn.open()
    try:
        found = gather(host, conn)
    finally:
        conn.close()
    click.echo(json.dumps(redactor.redact(found.as_dict()), indent=2))
