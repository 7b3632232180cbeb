"""`python -m app` is the `smsgate` command."""

from app.cli.main import main

main()
