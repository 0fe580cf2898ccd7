"""The image factory: one stage per module, each a function over a BuildContext."""
