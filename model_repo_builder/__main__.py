"""`python -m model_repo_builder` runs the CLI."""

from model_repo_builder.cli import main

raise SystemExit(main())
