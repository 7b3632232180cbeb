"""Development helpers: embedded PostgreSQL and Redis, and `smsgate dev` (everything in one)."""
