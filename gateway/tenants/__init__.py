"""Tenants: API keys with scopes, limits, priorities and usage."""
