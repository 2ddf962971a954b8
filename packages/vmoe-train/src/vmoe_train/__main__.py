"""`python -m vmoe_train`: the `vmoe-train` command (see vmoe_train.cli)."""

from vmoe_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
