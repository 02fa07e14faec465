"""Prepare a data config's token shards ahead of training: `python data/prepare.py data=tinyshakespeare`."""
from mea.data.cli import main

if __name__ == "__main__":
    main()
