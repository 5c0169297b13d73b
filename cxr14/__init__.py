"""cxr14: what the commands and the user's files at the top share. No install: a script's own folder is on sys.path,
so `python train.py` imports this package from beside it (docs/development.md, "The design")."""
