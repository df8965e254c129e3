"""The wire: request and answer types, RateLimit headers, denial answers and the OpenAPI spec."""
