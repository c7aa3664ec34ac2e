"""The backends; importing this package registers all of them (see fusedres.backend)."""

from fusedres.backends import eager, extension, triton  # noqa: F401
