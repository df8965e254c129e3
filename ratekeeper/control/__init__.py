"""What admins control and how every process hears of it: flags, bans, audit, propagation."""
