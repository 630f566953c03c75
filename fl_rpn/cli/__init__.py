"""The command-line entry points (``fl-rpn-*``): thin Hydra / argparse apps over the library."""
