"""Attribution methods: `available()` lists them; `explain()` runs one or several."""
from .base import REGISTRY, Context, Method, available, explain, get, register

__all__ = ["available", "explain", "get", "register", "Method", "Context", "REGISTRY"]
