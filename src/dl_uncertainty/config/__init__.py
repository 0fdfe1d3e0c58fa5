"""The configuration layer: typed schemas (``schema``), composition and override helpers
(``compose``) and value checks (``checks``). It imports nothing of the project but ``errors``
and the family registry's names.
"""
