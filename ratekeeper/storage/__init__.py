"""Where counts live: Redis clients, Lua calls, the coalescer, Cluster slots, the breaker."""
