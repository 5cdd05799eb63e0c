"""``python -m argrpo`` is the ``argrpo`` command."""

from argrpo.recipes.cli import main

if __name__ == "__main__":
    main()
