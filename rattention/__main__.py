"""``python -m rattention ARGS``: the ``rattention`` command line where the console script is not at hand:
``torchrun --nproc-per-node 2 -m rattention train CONFIG --no-ray``, ``ray job submit -- python -m rattention ...``."""

from rattention.cli import main

if __name__ == "__main__":
    main()
