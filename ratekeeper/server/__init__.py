"""The HTTP server: runtime state, the check and authz endpoints, connection guard, warm-up."""
