# A package, so that this directory's conftest.py is imported as ``kernels.conftest`` and does not
# replace tests/conftest.py as the module ``conftest`` that other test files import from.
