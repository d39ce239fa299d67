"""Compatibility layers for users of other libraries' APIs (`ddpo.compat.trl`: TRL <= 0.23's DDPO)."""
