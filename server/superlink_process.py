"""`flower-superlink` keeping nodes, runs and messages in its SQLite file but the model arrays in memory."""
from __future__ import annotations

import sys

MODULE = "leukfed.server.superlink_process"   # what the SuperLink's command line shows (pidfile check)


def objects_in_memory() -> None:
    """Flower 1.41 stores every message object (each 5 MB chunk of every model sent or received) in the
    `--database` file when one is given: about 0.5 GB of SQLite writes and commits per round for
    resnet18 and 3 sites. Those objects live for one exchange, and leuk-server checkpoints the model
    itself, so they go to Flower's in-memory object store; registrations and runs still outlive a
    restart. Flower's LinkState takes any ObjectStore, which is what its in-memory mode pairs it with."""
    import flwr.superlink.main as link_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    flower_factories = link_main.get_objectstore_linkstate_factories

    def factories(database: str, federation_manager):
        if database == FLWR_IN_MEMORY_DB_NAME or ("://" in database and not database.startswith("sqlite")):
            return flower_factories(database, federation_manager)
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    link_main.get_objectstore_linkstate_factories = factories


def command() -> list[str]:
    """The command that starts this SuperLink (arguments as for `flower-superlink`)."""
    return [sys.executable, "-m", MODULE]


def main() -> None:
    objects_in_memory()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
