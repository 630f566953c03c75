"""The detector and its RPN variants: the model builder, the RPNs, their heads and losses, the registry and the
anchor statistics.

Importing the package registers the RPN variants (``rpn_registry`` holds the built-in ones); a variant defined in a
module of its own is imported here too, so that it registers before a config is checked.
"""

from . import rpn_registry  # noqa: F401  (registers the built-in variants: sampled, focal)
