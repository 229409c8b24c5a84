"""Print the SuperNodes registered at a SuperLink with the names they were given.

``flwr supernode list --format json`` (Flower 1.39) leaves out the name a key was
registered under (``flwr supernode register --name``), which is a site's identity in
SiteBridge; ``register-site.sh`` runs this file to refuse a second key under a name
that is already registered. It asks the Control API's ``ListNodes`` through the flwr
CLI's own connection code (Flower 1.39: ``read_superlink_connection``,
``init_http_client_from_connection``), so it reads the same ``config.toml``.

Usage: python deploy/registered_names.py CONNECTION [--name NAME]

Prints one line per registered (not unregistered) node: ``<node id> <status> <name>``;
with ``--name``, only the nodes registered under NAME. Exit status 0, or 1 when the
SuperLink can't be asked (the message says why).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence


def registered_nodes(connection: str) -> list[tuple[int, str, str]]:
    """(node id, status, name) of every node registered and not unregistered."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    # The CLI's connection code prints which connection it uses: not our output.
    with contextlib.redirect_stdout(sys.stderr):
        client = init_http_client_from_connection(read_superlink_connection(connection))
        try:
            response = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
    return [
        (int(node.node_id), str(node.status), str(node.name))
        for node in response.nodes_info
        if node.status != "unregistered"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the registered nodes (of one name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connection", help="the connection name in config.toml")
    parser.add_argument("--name", help="only the nodes registered under this name")
    args = parser.parse_args(argv)
    try:
        nodes = registered_nodes(args.connection)
    except Exception as error:  # the CLI's errors come in many types; say which
        print(f"could not list the SuperNodes: {error}", file=sys.stderr)
        return 1
    for node_id, status, name in nodes:
        if args.name is None or name == args.name:
            print(f"{node_id} {status} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
