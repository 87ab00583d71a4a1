"""Selection methods, one file each, registered by name. A new method is one new file imported here."""
from lessismore.methods import full, lessismore, oracle, quest, streaming, tidaldecode  # noqa: F401  (registration)
from lessismore.methods.base import LayerRole, Method, Selection, available, budget_grid, get, register

__all__ = ["LayerRole", "Method", "Selection", "available", "budget_grid", "get", "register"]
