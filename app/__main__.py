"""`python -m app` is the `smsgate` command."""

from app.cli import main

main()
