"""quotelab's built-in plugins, registered exactly like third-party ones (see quotelab.strategy.registry)."""
