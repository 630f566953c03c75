"""The detector and its RPN variants: the model builder, the RPNs, their heads and losses, the registry and the
anchor statistics."""
