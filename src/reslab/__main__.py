"""``python -m reslab`` runs the CLI (and is what ``torchrun -m reslab`` starts)."""

from reslab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
