"""Who a request is: IP normalisation, keyed hashing, key names, the forwarded address."""
