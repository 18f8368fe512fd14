"""``python -m tasklib_sqla`` runs the command line."""

from .cli import main

raise SystemExit(main())
