"""A kind module that fails to import, as one with a missing dependency does."""

import a_module_nobody_installed  # noqa: F401
