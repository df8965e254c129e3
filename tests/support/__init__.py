"""Helpers the tests import: servers they start, clients, shared values."""
