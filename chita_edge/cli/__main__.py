"""``python -m chita_edge.cli``: the ``chita-edge`` command (what torchrun starts in each process)."""

from chita_edge.cli import main

if __name__ == "__main__":
    main()
