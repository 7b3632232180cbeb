"""`python -m app.cli` is the `smsgate` command too."""

from app.cli.main import main

main()
