"""``python -m listener`` and the ``listener`` console script."""

import sys

from listener import hangups


def main() -> None:
    """Run the command line; for ``run``, note signals before the imports (hangups)."""
    if sys.argv[1:2] == ["run"]:
        hangups.note()
    from listener.cli import main as cli  # noqa: PLC0415 - after the handler, on purpose

    cli()


if __name__ == "__main__":
    main()
