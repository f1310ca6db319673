"""Block families: one file each, holding the training-time module(s) and the recipe.

Importing this package registers every built-in recipe.
"""

from . import common, repvgg  # noqa: F401
from . import acnet, dbb, mobileone  # noqa: F401
from . import inception, refconv, repmlp, repnext, repnext_m  # noqa: F401
