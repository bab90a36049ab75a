"""nr's test suite. A regular package, so that `tests.*` imports find these files and never another
distribution's top-level `tests` package (torch-fidelity installs one into site-packages)."""
