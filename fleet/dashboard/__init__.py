"""A read-only live dashboard for a running fleet (``serve --dashboard``, ``simulate --dashboard``)."""
